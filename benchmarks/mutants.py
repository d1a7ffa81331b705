"""Planted bugs: does the test suite catch each one?

    python benchmarks/mutants.py                 # every bug, one after another
    python benchmarks/mutants.py --only sort-descending --only label-lam

Each bug is one or more exact text replacements in the core. They are applied in turn to a COPY of the
repository (catchup/, train.py, evaluate.py, tests/, configs/, pytest.ini in a temporary folder; the real tree is
never touched), and only the tests named to catch the bug run there (``pytest -n 0 -x``, with a timeout). A bug
is caught when those tests fail. A snippet that is not found exactly once makes the bug "patch does not apply",
so the list stays honest when the code moves. Prints a Markdown table; exits non-zero when any bug is not
caught or does not apply.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:        # runnable as a script from any directory
    sys.path.insert(0, str(_ROOT))

from catchup.cli import run_cli  # noqa: E402
from catchup.errors import CatchupError  # noqa: E402

COPIED = ("catchup", "train.py", "evaluate.py", "tests", "configs", "pytest.ini")


@dataclass(frozen=True)
class Bug:
    name: str
    what: str
    edits: tuple[tuple[str, str, str], ...]     # (file, exact old snippet, new snippet)
    tests: tuple[str, ...]                      # pytest node ids that must fail
    timeout: int = 300


BUGS = [
    Bug("sort-descending", "Catch-up Mix keeps the strongest channels (RFI sorted descending)",
        (("catchup/mix/catchup.py", "order = torch.sort(rfi, dim=1, stable=True).indices",
          "order = torch.sort(rfi, dim=1, stable=True, descending=True).indices"),),
        ("tests/test_catchup_mix.py::test_hand_worked_example",)),
    Bug("rfi-sign", "relative filter influence with the sign flipped (partner minus own)",
        (("catchup/mix/catchup.py", "rfi = fi - fi[index]", "rfi = fi[index] - fi"),),
        ("tests/test_catchup_mix.py::test_matches_slow_reference",)),
    Bug("label-lam", "Catch-up Mix label weight lam instead of floor(lam*C)/C",
        (("catchup/mix/catchup.py",
          'lam_eff = n_keep / stage.channels if self.label_lam == "exact" else lam', "lam_eff = lam"),),
        ("tests/test_mixers.py::test_catchup_label_weight_is_the_exact_kept_share_unless_sampled_is_asked",)),
    Bug("hook-in-eval", "the stage hook fires in eval()",
        (("catchup/mix/plan.py", "if not module.training or module is not hooked:", "if module is not hooked:"),
         ("catchup/mix/plan.py", "if module is self.model and module.training:", "if module is self.model:")),
        ("tests/test_mixers.py::test_never_fires_in_eval_or_on_an_ema_copy",)),
    Bug("hook-on-ema", "the stage hook fires on an EMA deepcopy of the model",
        (("catchup/mix/plan.py", "if not module.training or module is not hooked:", "if not module.training:"),
         ("catchup/mix/plan.py", "if module is self.model and module.training:", "if module.training:")),
        ("tests/test_mixers.py::test_never_fires_in_eval_or_on_an_ema_copy",)),
    Bug("partner-rolled", "feature mixing takes channels from the next sample's partner (index rolled by one)",
        (("catchup/mix/catchup.py", "index = plan.index.to(h.device, non_blocking=True)",
          "index = plan.index.roll(1).to(h.device, non_blocking=True)"),),
        ("tests/test_mixers.py::test_catchup_hook_mixes_the_stage_output_as_the_reference_does",)),
    Bug("hook-fires-twice", "the stage hook stays armed after it mixed, so a stage run twice mixes twice",
        (("catchup/mix/plan.py", "self.plan, self._applied = None, plan", "self._applied = plan"),),
        ("tests/test_mixers.py::test_hook_fires_at_most_once_per_forward_even_if_the_stage_runs_twice",)),
    Bug("plan-rides-flip", "the collated plan rides through x.flip(0), whose partners then point at other samples",
        (("catchup/mix/batch.py", 'names = ["to", "cuda",', 'names = ["flip", "to", "cuda",'),),
        ("tests/test_timm_dropin.py::test_only_order_keeping_operations_carry_the_plan_and_a_lost_plan_is_refused",)),
    Bug("targets-swapped", "soft target weights swapped (own label gets the partner's weight)",
        (("catchup/mix/plan.py", "return y * own + other * partner", "return y * partner + other * own"),),
        ("tests/test_mixers.py::test_soft_targets_sum_to_one_and_weight_the_source_by_lam_eff",)),
    Bug("smoothing-off-by-n", "label smoothing spreads s/(N-1) instead of s/N off the true class",
        (("catchup/mix/plan.py", "off = smoothing / num_classes", "off = smoothing / (num_classes - 1)"),),
        ("tests/test_mixers.py::test_soft_targets_sum_to_one_and_weight_the_source_by_lam_eff",)),
    Bug("cutmix-lam-uncorrected", "CutMix label weight is the sampled lambda, not the pasted box's area",
        (("catchup/mix/mixer.py",
          "1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(x.shape[-2] * x.shape[-1])", "plan.lam"),),
        ("tests/test_mixers.py::test_cutmix_label_weight_is_the_kept_area",)),
    Bug("influence-fp16", "filter influence computed in the input dtype (no float32 upcast)",
        (("catchup/mix/catchup.py", "dim=tuple(range(2, h.dim())), dtype=torch.float32)",
          "dim=tuple(range(2, h.dim())))"),),
        ("tests/test_catchup_mix.py::test_influence_is_float32_and_does_not_overflow_in_half",)),
    Bug("resume-no-rng", "resume keeps the fresh process's RNG states instead of the checkpoint's",
        (("catchup/resume.py", "        self.accelerator.load_state(str(folder))\n",
          "        import random, numpy\n"
          "        kept = random.getstate(), numpy.random.get_state(), torch.get_rng_state()\n"
          "        self.accelerator.load_state(str(folder))\n"
          "        random.setstate(kept[0]); numpy.random.set_state(kept[1]); torch.set_rng_state(kept[2])\n"),),
        ("tests/test_checkpointer.py::test_load_restores_every_random_stream_and_the_named_parts",)),
    Bug("schedule-from-zero", "the lr schedule restarts from step 0 on resume",
        (("catchup/resume.py", "scheduler.step_update(num_updates=self.progress.global_step)",
          "scheduler.step_update(num_updates=0)"),),
        ("tests/test_train.py::test_resume_after_max_steps_gives_the_same_weights[0]",)),
    Bug("mixer-state-lost", "the mixer's call count is not restored on resume",
        (("catchup/mix/mixer.py", 'self.calls = int(state["calls"])', "pass"),),
        ("tests/test_baselines.py::test_state_dict_round_trip_replays[catchup]",
         "tests/test_checkpointer.py::test_load_restores_every_random_stream_and_the_named_parts")),
    Bug("worker-batch-off-by-one", "a DataLoader worker numbers its batches one too far (plan of the next batch)",
        (("catchup/mix/mixer.py", "* worker.num_workers + worker.id", "* worker.num_workers + worker.id + 1"),),
        ("tests/test_timm_dropin.py::test_collate_plans_are_numbered_by_batch_so_workers_and_a_resume_replay_them",)),
    Bug("eval-gather", "evaluation gathers with gather, counting the padded last batch twice",
        (("catchup/engine.py", "gather=accelerator.gather_for_metrics)", "gather=accelerator.gather)"),),
        ("tests/test_engine_eval.py::test_evaluate_counts_each_sample_once_across_processes",)),
    Bug("fgsm-against-sign", "FGSM steps against the gradient sign",
        (("catchup/robustness/fgsm.py", "x01.detach() + eps * grad.sign()", "x01.detach() - eps * grad.sign()"),),
        ("tests/test_robustness.py::test_fgsm_matches_per_sample_loop_and_bounds",)),
    Bug("fgsm-no-clamp", "FGSM images not clamped to [0, 1]",
        (("catchup/robustness/fgsm.py", "(x01.detach() + eps * grad.sign()).clamp_(0.0, 1.0)",
          "(x01.detach() + eps * grad.sign())"),),
        ("tests/test_robustness.py::test_fgsm_matches_per_sample_loop_and_bounds",)),
    Bug("mce15-over-all", "mCE-15 averaged over every corruption found, not the 15 standard ones",
        (("catchup/robustness/corruptions.py",
          "standard = [float(e) for (name, _), e in errors.items() if name in CIFAR_CORRUPTIONS_15]",
          "standard = [float(e) for (name, _), e in errors.items()]"),),
        ("tests/test_robustness.py::test_corruption_summary_means",)),
    Bug("checksum-unchecked", "a checkpoint file whose sha256 differs from the manifest's is loaded anyway",
        (("catchup/resume.py", 'if _sha256(path) != want["sha256"]:', "if False:"),),
        ("tests/test_resume.py::test_a_bit_flip_in_the_weights_falls_back_to_the_previous_checkpoint",)),
]


def apply(tree: Path, bug: Bug) -> dict[Path, str] | str:
    """Patch ``tree``; returns the original texts to restore, or (a str) why the patch does not apply."""
    originals: dict[Path, str] = {}
    texts: dict[Path, str] = {}
    for file, old, new in bug.edits:
        path = tree / file
        text = texts.get(path, path.read_text() if path.is_file() else "")
        count = text.count(old)
        if count != 1:
            return f"patch does not apply ({file}: snippet found {count} times)"
        originals.setdefault(path, text)
        texts[path] = text.replace(old, new)
    for path, text in texts.items():
        path.write_text(text)
    return originals


def run_bug(tree: Path, bug: Bug, clean: bool = False) -> dict:
    """Run the bug's tests on the patched tree (``clean``: unpatched, where they must pass)."""
    patched = {} if clean else apply(tree, bug)
    if isinstance(patched, str):
        return {"caught": "no", "note": patched, "seconds": 0.0}
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-x", "-q", "-p", "no:cacheprovider",
                               *bug.tests], cwd=tree, env=env, capture_output=True, text=True, timeout=bug.timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-1:]
        # the first assertion line, so a reader sees the tests failed for the bug and not for something else
        why = next((line[1:].strip() for line in proc.stdout.splitlines() if line.startswith("E ")), "")
    except subprocess.TimeoutExpired:
        rc, tail = None, [f"timed out after {bug.timeout} s"]
        why = ""
    finally:
        for path, text in patched.items():
            path.write_text(text)
    seconds = time.perf_counter() - start
    # 1: tests failed. 2-5 (interrupted, internal error, usage, nothing collected) say the run itself is wrong.
    caught = "yes" if rc == (0 if clean else 1) else "no"
    note = f"pytest rc {rc}: {' '.join(tail)}" if caught != "yes" else "" if clean else why
    return {"caught": caught, "note": note[:90].replace("|", "\\|"), "seconds": seconds}


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        src = _ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this bug (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the bugs and their catching tests")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--clean", action="store_true",
                        help="run the catching tests on the unpatched copy instead: each must pass there, or a "
                             "'caught' would mean nothing")
    args = parser.parse_args(argv)
    names = [b.name for b in BUGS]
    unknown = [n for n in args.only if n not in names]
    if unknown:
        raise CatchupError(f"unknown bug {unknown[0]!r}; the bugs are {', '.join(names)}")
    bugs = [b for b in BUGS if not args.only or b.name in args.only]
    if args.list:
        for b in bugs:
            print(f"{b.name}: {b.what} -> {', '.join(b.tests)}")
        return []
    rows = []
    column = "passes unpatched" if args.clean else "caught"
    print(f"| bug | catching test(s) | {column} | seconds |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="catchup-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        for bug in bugs:
            row = {"bug": bug.name, **run_bug(tree, bug, args.clean)}
            rows.append(row)
            tests = "<br>".join(t.replace("tests/", "") for t in bug.tests)
            caught = row["caught"] + (f" (`{row['note']}`)" if row["note"] else "")
            print(f"| {bug.name}: {bug.what} | {tests} | {caught} | {row['seconds']:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    missed = [r["bug"] for r in rows if r["caught"] != "yes"]
    if args.clean:
        print(f"\n{len(rows) - len(missed)} of {len(rows)} bugs' catching tests pass on the unpatched code")
        if missed:
            raise CatchupError(f"catching tests fail without the bug: {', '.join(missed)}")
        return rows
    print(f"\n{len(rows) - len(missed)} of {len(rows)} planted bugs caught")
    if missed:
        raise CatchupError(f"not caught or not applied: {', '.join(missed)}")
    return rows


if __name__ == "__main__":
    run_cli(main)
