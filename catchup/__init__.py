"""catchup: Catch-up Mix and mixup baselines for timm CNNs."""
