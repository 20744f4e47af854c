"""Mutation check: break each documented guarantee once and run the tests that name it (issue 26).

A hand-written list, not a random mutator: every entry breaks exactly one guarantee of
``docs/optimizers.md`` (step schedule, safety, low precision, resume, replay) or ``docs/backends.md``
("What every backend guarantees"), or one promise a test name makes, with a realistic bug (a skipped
restore, a fair coin for stochastic rounding, a dropped micro-batch, a missing check). For each it

1. copies the working tree's tracked and untracked-but-not-ignored files into one scratch directory
   (``git ls-files -co --exclude-standard``; the repository itself is never modified),
2. applies the edit (the ``old`` text must occur exactly once, else the entry is reported stale),
3. runs ``python -m pytest -x -q -n 0 -p no:cacheprovider <the tests that name the guarantee>``
   with ``PYTHONPATH=<scratch>/src``, and
4. reports KILLED (the tests failed, as they must), SURVIVED (they passed: a weak test), STALE (the
   edit no longer applies, or selects no test) or ERROR (pytest itself failed), then restores the file.

Usage, from the repository root (about 10 minutes on 2 busy cores; ``--slow`` adds the example and
asset entries, which start transformers, Flower and Ray):

    nice -n 10 python tools/mutate.py [--slow] [--only ID ...] [--list] [--out FILE] [--tree REV]

Exit status 1 unless every mutation was KILLED. Record a run under ``benchmarks/results/``
(date, command, survivor count; see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    id: str
    guarantee: str  # where it is documented, and what it says
    path: str  # file to edit, relative to the repository root
    edits: tuple[tuple[str, ...], ...]  # (old, new) in path, or (other path, old, new): old occurs once
    tests: tuple[str, ...]  # pytest arguments (node ids, -k expressions)
    slow: bool = False


def m(id, guarantee, path, old, new, *tests, slow=False, more=()):
    return Mutation(id, guarantee, path, ((old, new), *more), tests, slow)


OPT = "tests/test_optim_common.py"
MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------ docs/backends.md
    m("backend-import-broken",
      "backends.md: every backend is tested against the reference; a broken backend fails its tests (issue 26)",
      "src/zo_optim/ops/cpu/__init__.py", "\n__all__", '\nraise ImportError("x")\n__all__',
      "tests/test_ops.py::test_auto_resolution", "tests/test_ops.py::test_fast_backend_refuses_float64"),
    m("sr-fair-coin",
      "backends.md: one rounding per store, stochastic for bf16/fp16 (optimizers.md Low precision: unbiased)",
      "src/zo_optim/rng.py", "    mag = (lo + (u < frac).to(torch.float64)) * ulp",
      "    mag = (lo + ((u < 0.5) & (frac > 0)).to(torch.float64)) * ulp",
      "tests/test_optim_lowprec.py::test_update_uses_stochastic_rounding_for_bf16"),
    m("philox-constant",
      "backends.md: Philox words bit-identical to the reference (docs/rng.md: the RNG contract)",
      "src/zo_optim/rng.py", "PHILOX_M0 = 0xD2511F53", "PHILOX_M0 = 0xD2511F55", "tests/test_rng.py"),
    m("noncontiguous-not-written-back",
      "backends.md: non-contiguous tensors are run on contiguous copies and written back",
      "src/zo_optim/ops/__init__.py", "        orig.copy_(work)  # an in-place torch op", "        pass  # ",
      "tests/test_ops.py::test_leaf_params_requiring_grad_outside_no_grad"),
    m("precond-clamp-dropped",
      "optimizers.md Safety: bounded preconditioners, Σ and K clamped to [hessian_min, float32 max]",
      "src/zo_optim/ops/reference.py",
      "torch.clamp(precond_decay * old + precond_rate * new, min=precond_min, max=F32_MAX)",
      "(precond_decay * old + precond_rate * new)",
      "tests/test_optim_poison.py", "-k", "precond_clamp or sigma_floor"),
    # ------------------------------------------------------------ docs/optimizers.md: step schedule and protocol
    m("deferred-restore-half",
      "optimizers.md Step schedule: the last restore is fused into the update pass (estimate(restore=False))",
      "src/zo_optim/optim/_perturbation.py", "        return -self.scale, self.query",
      "        return -0.5 * self.scale, self.query",
      "tests/test_optim_deferred_restore.py", "-k", "accumulation_saves"),
    m("fused-restore-skipped-lowprec",
      "optimizers.md Low precision: the in-place round trip moves weights by rounding only",
      "src/zo_optim/optim/_perturbation.py", "        return -self.scale, self.query",
      "        return 0.0, self.query",
      "tests/test_optim_lowprec.py::test_inplace_round_trip_drifts_in_low_precision"),
    m("restore-skipped",
      "federated.md / optimizers.md: estimate() returns with the weights restored (ulps in place)",
      "src/zo_optim/optim/_perturbation.py",
      '        """Undo any offset with one explicit pass (used on errors, skips and after ``estimate``)."""\n'
      "        if self.scale != 0.0:",
      '        """Undo any offset with one explicit pass (used on errors, skips and after ``estimate``)."""\n'
      "        if False:",
      "tests/test_federated_core.py::test_inplace_estimate_is_not_exact_so_the_wrapper_must_restore"),
    m("accumulate-last-only",
      "optimizers.md Using them: estimate() per micro-batch accumulates Σ w·g / Σ w",
      "src/zo_optim/optim/_estimate.py",
      "        self.grads = wg if self.grads is None else self.grads + wg",
      "        self.grads = wg",
      OPT + "::test_split_estimate_step_accumulates",
      more=(("        self.weight += weight", "        self.weight = weight"),)),
    m("loss-one-probe",
      "base.py estimate(): returns the loss estimate of L(θ): L0 when measured, else the mean of the probes",
      "src/zo_optim/optim/_estimate.py",
      "        return torch.stack([t.mean() for t in self.plus + self.minus]).mean()",
      "        return self.plus[0].mean()",
      OPT, "-k", "returned_loss"),
    # ------------------------------------------------------------ docs/optimizers.md: Safety
    m("exception-no-restore",
      "optimizers.md Safety: an exception in the closure restores the weights before it propagates",
      "src/zo_optim/optim/_estimate.py", "        except BaseException:\n            pert.restore()\n            raise",
      "        except BaseException:\n            raise",
      OPT + "::test_raising_closure_restores_weights",
      # the same restore is made again by estimate() and step() (defence in depth): all three go
      more=(("src/zo_optim/optim/base.py", "                self._perturbation.restore()\n                raise\n\n"
             "    def step(", "                raise\n\n    def step("),
            ("src/zo_optim/optim/base.py", "            except BaseException:\n                self._perturbation"
             ".restore()\n                raise\n        return loss", "            except BaseException:\n"
             "                raise\n        return loss"))),
    m("nonfinite-applied",
      "optimizers.md Safety: a non-finite loss restores the weights and skips the step",
      "src/zo_optim/optim/_estimate.py", "            finite = bool(torch.isfinite(checked).all())",
      "            finite = True",
      OPT, "-k", "nonfinite"),
    m("apply-update-accepts-nan",
      "optimizers.md Safety: apply_update with a non-finite scalar is refused before any write",
      "src/zo_optim/optim/base.py", "        if bad:\n            raise ValueError(",
      "        if False:\n            raise ValueError(",
      "tests/test_optim_poison.py", "-k", "apply_update_refuses_non_finite"),
    m("zo-eps-range-dropped",
      "optimizers.md Safety: zo_eps outside [1e-18, 100] is refused",
      "src/zo_optim/optim/_validation.py", "    if not lo <= value <= hi:", "    if False:",
      "tests/test_optim_poison.py", "-k", "zo_eps_outside"),
    m("deepcopy-allowed",
      "optimizers.md Safety: copy.deepcopy(opt) raises a TypeError pointing at state_dict()",
      "src/zo_optim/optim/_checkpoint.py",
      '        raise self._refuse_copy("deep-copied (copy.deepcopy)")',
      "        return object.__new__(type(self))",
      "tests/test_optim_safety.py", "-k", "copy_and_pickle"),
    # ------------------------------------------------------------ docs/optimizers.md: Seeds, determinism, resume
    m("resume-loses-step",
      "optimizers.md Seeds, determinism, resume: resume from state_dict() is bit-exact",
      "src/zo_optim/optim/_checkpoint.py", '            "step": self._t,', '            "step": 0,',
      OPT + "::test_state_dict_round_trip_and_bit_exact_resume"),
    # ------------------------------------------------------------ apps and examples (--slow)
    m("asset-random-weights",
      "demo.md: the classifier is the packaged all-MiniLM-L6-v2 checkpoint",
      "src/zo_optim/apps/assets.py",
      "            encoder = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True, "
      "add_pooling_layer=False)",
      "            from transformers import AutoConfig\n"
      "            encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(minilm_path())), "
      "add_pooling_layer=False)",
      "tests/test_assets.py::test_classifier_matches_the_pretrained_sentence_embedding", slow=True),
    m("hiso-lr-hundredth",
      "federated.md: a simulated run trains the head (tests/test_federated_cli.py names it)",
      "src/zo_optim/optim/hiso.py", 'coeffs, lr=group["lr"], precond=', 'coeffs, lr=group["lr"] * 0.01, precond=',
      "tests/test_federated_cli.py::test_simulated_run_trains_the_head_and_replicas_agree", slow=True),
    m("flower-example-lr-zero",
      "examples/flower: the example apps train (held-out accuracy and loss improve)",
      "src/zo_optim/optim/hiso.py", 'coeffs, lr=group["lr"], precond=', 'coeffs, lr=group["lr"] * 0.0, precond=',
      "tests/test_examples_flower.py::test_example_apps_train_and_stay_identical", slow=True),
    m("hf-example-lr-zero",
      "integrations.md: ZOTrainer updates the trainable weights (examples/hf_trainer_minilm.py --smoke)",
      "src/zo_optim/optim/mezo.py", 'coeffs, lr=group["lr"], weight_decay=', 'coeffs, lr=0.0, weight_decay=',
      "tests/test_examples_hf.py::test_hf_trainer_minilm_smoke", slow=True),
    m("demo-cache-perturbed",
      "demo.md: the cached frozen prefix is exact (same logits as the full model)",
      "src/zo_optim/apps/demo.py", "def _logits(", "def _logits_exact(",
      "tests/test_demo.py::test_training_changes_only_trainable_params_and_cache_is_exact", slow=True,
      more=(("\n\ndef train_loop(", "\n\ndef _logits(*a, **k):\n    return _logits_exact(*a, **k) + 1e-6\n\n\n"
             "def train_loop("),)),
]


def scratch_copy(dest: Path, tree: str | None = None) -> None:
    if tree is not None:  # a committed tree instead (e.g. to show a mutation survived the tests before a fix)
        archive = subprocess.run(["git", "archive", tree], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_one(mut: Mutation, scratch: Path, timeout: float) -> tuple[str, float, str]:
    originals: dict[Path, str] = {}
    texts: dict[Path, str] = {}
    for edit in mut.edits:
        path, old, new = edit if len(edit) == 3 else (mut.path, *edit)  # (old, new) edits mut.path
        target = scratch / path
        if target not in texts:
            originals[target] = texts[target] = target.read_text()
        if texts[target].count(old) != 1:
            return "STALE", 0.0, f"{old[:60]!r} occurs {texts[target].count(old)} times in {path}"
        texts[target] = texts[target].replace(old, new)
    for target, text in texts.items():
        target.write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(scratch / "src"), str(scratch / "tests")])}
    t0 = time.monotonic()
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider",
                              *mut.tests], cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = res.returncode, (res.stdout + res.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, ["timeout"]
    finally:
        for target, text in originals.items():
            target.write_text(text)
    seconds = time.monotonic() - t0
    if rc == 0:
        return "SURVIVED", seconds, " ".join(tail)
    if rc == 5:
        return "STALE", seconds, "no test selected: " + " ".join(tail)
    if rc != 1:  # interrupted, internal or usage error, timeout: no verdict on the tests
        return "ERROR", seconds, f"pytest exit status {rc}: " + " ".join(tail)
    return "KILLED", seconds, " ".join(tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slow", action="store_true", help="also the asset/demo/example entries")
    p.add_argument("--only", nargs="*", default=None, help="run these mutation ids")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation")
    p.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    p.add_argument("--tree", default=None, help="mutate this commit's tree instead of the working tree")
    a = p.parse_args(argv)
    chosen = [x for x in MUTATIONS if (a.only is None and (a.slow or not x.slow)) or (a.only and x.id in a.only)]
    if a.list:
        for x in MUTATIONS:
            print(f"{x.id:32} {'slow ' if x.slow else ''}{x.guarantee}\n{'':32} tests: {' '.join(x.tests)}")
        return 0
    lines = ["| mutation | guarantee | tests | result | s |", "|---|---|---|---|---|"]
    survivors = []
    with tempfile.TemporaryDirectory(prefix="zo-mutation-") as tmp:
        scratch = Path(tmp)
        scratch_copy(scratch, a.tree)
        for x in chosen:
            status, seconds, detail = run_one(x, scratch, a.timeout)
            print(f"{status:9} {x.id:32} {seconds:6.1f}s  {detail}", flush=True)
            lines.append(f"| `{x.id}` | {x.guarantee} | `{' '.join(x.tests)}` | {status} | {seconds:.0f} |")
            if status != "KILLED":
                survivors.append(x.id)
    summary = f"{len(chosen)} mutations, {len(survivors)} survived or stale: {', '.join(survivors) or 'none'}"
    print(summary)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join([*lines, "", summary, ""]))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
