"""The self-check (egma_kernels/selfcheck.py): egma-bench --selfcheck, the first-use check, its cache, the test hook.

conftest.py turns the first-use check off for the suite; the tests here turn it on (``first_use`` fixture) with
the verdicts in a fresh folder, and forget this process's verdicts before and after each test.
"""

import json
import os
import warnings

import pytest
import torch

import egma_kernels as ek
from egma_kernels import backends, selfcheck
from egma_kernels.bench import cli
from conftest import make_inputs

needs_cpu_backend = pytest.mark.skipif("cpu" not in ek.available_backends("cpu"), reason="egma_kernels._C is not built")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_state(tmp_path, monkeypatch):
    monkeypatch.setenv(selfcheck.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(selfcheck.ENV_PERTURB, raising=False)
    backends.reset_first_use_state()
    yield
    backends.reset_first_use_state()


@pytest.fixture
def first_use(monkeypatch):
    monkeypatch.setenv(selfcheck.ENV_FIRST_USE, "1")


@pytest.fixture
def check_runs(monkeypatch):
    """The backends each self-check run (``run_cases``) checked, in order."""
    ran = []
    run_cases = selfcheck.run_cases
    monkeypatch.setattr(selfcheck, "run_cases", lambda name, *a, **k: ran.append(name) or run_cases(name, *a, **k))
    return ran


def _loss(backend=None):
    x = make_inputs([3, 1, 2], 5, 16, seed=3, gaze="mixed", dtype=torch.float32)
    x["patch_emb"].requires_grad_(True)
    terms = ek.fine_grained_loss(**x, backend=backend, return_details=True)
    terms.loss.backward()
    return terms.loss.detach(), x["patch_emb"].grad


def _selfcheck_cli(tmp_path, *extra):
    report = tmp_path / "report.json"
    rc = cli.main(["--selfcheck", "--device", "cpu", "--report", str(report), "--quiet", *extra])
    return rc, json.loads(report.read_text())


def _self_warnings(caught):
    return [w for w in caught if issubclass(w.category, backends.SelfCheckWarning)]


# --- egma-bench --selfcheck ------------------------------------------------------------------------------


@needs_cpu_backend
def test_selfcheck_passes_on_the_cpu_backend_and_writes_the_report(tmp_path, capsys):
    rc, report = _selfcheck_cli(tmp_path, "--providers", "cpu")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "cpu on cpu: PASS" in out and "report written to" in out
    env = report["environment"]
    for field in ("name", "arch", "torch", "triton", "torch_cuda", "driver", "kernel_source_hash", "egma_kernels"):
        assert field in env, field
    assert len(env["kernel_source_hash"]["cpu"]) == 16
    assert report["tolerances"]["rtol"]["float32"] == 2e-4
    cpu = report["backends"]["cpu"]
    assert cpu["verdict"] == "PASS" and cpu["passed"]
    assert {c["dtype"] for c in cpu["cases"]} == {"float32", "bfloat16", "float16"}
    assert {"egma_compat" in c["case"] for c in cpu["cases"]} == {True, False}
    for case in cpu["cases"]:
        assert set(case["errors"]) == set(selfcheck.QUANTITIES)
        assert all(err <= bound for err, bound in case["errors"].values())
    assert cpu["timing"]["backend_ms"] > 0 and cpu["timing"]["reference_ms"] > 0
    # A passing full check is also the verdict the first-use check and a by-name choice look up.
    assert selfcheck.load_verdict("cpu", CPU)["passed"] is True


@needs_cpu_backend
@pytest.mark.parametrize("quantity", ["grad_patch", "grad_scale", "t2i", "mapping"])
def test_a_perturbed_backend_fails_the_selfcheck_and_is_reported(quantity, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(selfcheck.ENV_PERTURB, f"cpu:{quantity}")
    rc, report = _selfcheck_cli(tmp_path, "--providers", "cpu", "--device", "cpu")
    out = capsys.readouterr().out
    assert rc == 1
    assert "cpu on cpu: FAIL" in out and f"{quantity} error" in out
    cpu = report["backends"]["cpu"]
    assert cpu["verdict"] == "FAIL" and report["perturbed"] == f"cpu:{quantity}"
    failed = [c for c in cpu["cases"] if not c["ok"]]
    assert failed and len(failed) == len(cpu["cases"])  # every case sees the perturbation
    for case in failed:
        bad = [name for name, (err, bound) in case["errors"].items() if err > bound]
        assert bad == [quantity], case
    assert selfcheck.load_verdict("cpu", CPU)["passed"] is False


def test_unknown_perturbation_is_refused(monkeypatch):
    monkeypatch.setenv(selfcheck.ENV_PERTURB, "cpu:grad_everything")
    with pytest.raises(ValueError, match="EGMA_KERNELS_TEST_PERTURB: unknown quantity 'grad_everything'"):
        selfcheck._perturbation("cpu")


def test_selfcheck_refuses_a_backend_not_available_here(tmp_path, capsys):
    rc = cli.main(["--selfcheck", "--device", "cpu", "--providers", "cuda", "--report", str(tmp_path / "r.json")])
    assert rc == 2
    assert "cuda not available on cpu" in capsys.readouterr().err


triton_interpreted = pytest.mark.skipif(
    "triton" not in ek.available_backends("cpu"), reason="the triton backend runs CPU tensors only in the interpreter")


@triton_interpreted
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_in_the_interpreter_passes_and_a_perturbed_one_fails(monkeypatch):
    case = [c for c in selfcheck.FULL_CASES if c.name == "long report (17)"]  # the quickest in the interpreter
    result = selfcheck.run_cases("triton", CPU, case)
    assert result["passed"], [selfcheck.worst(c) for c in result["cases"] if not c["ok"]]
    assert {c["dtype"] for c in result["cases"]} == {"float32", "float16"}
    assert "bfloat16 skipped" in result["notes"][0]
    monkeypatch.setenv(selfcheck.ENV_PERTURB, "triton:grad_sent")
    result = selfcheck.run_cases("triton", CPU, case, dtypes=[torch.float32])
    assert not result["passed"] and "grad_sent error" in selfcheck.worst(result["cases"][0])


@triton_interpreted
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_full_selfcheck_of_triton_in_the_interpreter(tmp_path):
    rc, report = _selfcheck_cli(tmp_path, "--providers", "triton")
    assert rc == 0, [selfcheck.worst(c) for c in report["backends"]["triton"]["cases"] if not c["ok"]]


def test_a_backend_that_raises_fails_the_case(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed to compile")

    monkeypatch.setattr(selfcheck, "_run", lambda x, name, *a: broken() if name == "cpu" else None)
    record = selfcheck.run_case("cpu", selfcheck.FULL_CASES[0], torch.float32, CPU)
    assert record["ok"] is False and record["error"] == "RuntimeError: kernel failed to compile"
    assert "raised RuntimeError: kernel failed to compile" in selfcheck.worst(record)


def test_near_ties_are_redrawn():
    case = selfcheck.FULL_CASES[1]
    x = selfcheck.case_inputs(case, torch.bfloat16)
    assert selfcheck.argmax_gap(x, case.egma_compat) >= selfcheck.MIN_ARGMAX_GAP
    x["sent_emb"][1] = x["sent_emb"][0]  # two sentences of one report alike: every patch's best is a tie
    assert selfcheck.argmax_gap(x, case.egma_compat) == 0.0


# --- the first-use check ---------------------------------------------------------------------------------


@needs_cpu_backend
def test_first_use_checks_once_then_trusts_a_passing_backend(first_use, check_runs, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve_backend(None, CPU).name == "cpu"
        _loss()
        _loss()
    assert check_runs == ["cpu"]  # once, not per call
    assert _self_warnings(caught) == []
    files = os.listdir(tmp_path / "cache" / "selfcheck")
    assert len(files) == 1 and files[0].startswith("cpu-")
    verdict = json.loads((tmp_path / "cache" / "selfcheck" / files[0]).read_text())
    assert verdict["passed"] is True and verdict["kind"] == "first-use"
    # A new process (state forgotten) reads the verdict from disk instead of checking again.
    backends.reset_first_use_state()
    assert backends.resolve_backend(None, CPU).name == "cpu"
    assert check_runs == ["cpu"]


@needs_cpu_backend
def test_a_failing_backend_is_skipped_by_automatic_choice_with_one_warning(first_use, check_runs, monkeypatch):
    monkeypatch.setenv(selfcheck.ENV_PERTURB, "cpu:grad_sent")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, grad = _loss()
        _loss()
        assert backends.resolve_backend(None, CPU).name == "reference"
    messages = [str(w.message) for w in _self_warnings(caught)]
    assert len(messages) == 1, messages
    assert "backend 'cpu' FAILED its self-check" in messages[0] and "grad_sent error" in messages[0]
    assert "egma-bench --selfcheck" in messages[0] and selfcheck.ENV_FIRST_USE in messages[0]
    assert check_runs == ["cpu"]
    ref_loss, ref_grad = _loss("reference")
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)  # the reference ran
    assert selfcheck.load_verdict("cpu", CPU)["passed"] is False


@needs_cpu_backend
def test_a_backend_chosen_by_name_runs_with_one_warning_if_failed_or_unchecked(first_use, check_runs, monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loss("cpu")
        _loss("cpu")
    messages = [str(w.message) for w in _self_warnings(caught)]
    assert len(messages) == 1 and "has not been self-checked" in messages[0], messages
    assert check_runs == []  # by name: no check runs

    monkeypatch.setenv(selfcheck.ENV_PERTURB, "cpu:loss")
    selfcheck.save_verdict(selfcheck.run_cases("cpu", CPU, selfcheck.FIRST_USE_CASES), CPU, "first-use")
    backends.reset_first_use_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, _ = _loss("cpu")
        _loss("cpu")
    messages = [str(w.message) for w in _self_warnings(caught)]
    assert len(messages) == 1 and "FAILED its self-check" in messages[0] and "asked for by name" in messages[0]
    assert torch.allclose(loss, _loss("reference")[0])  # the cpu backend ran (the hook perturbs only the check)


@needs_cpu_backend
def test_a_changed_kernel_source_or_version_checks_again(first_use, check_runs, monkeypatch):
    backends.resolve_backend(None, CPU)
    assert check_runs == ["cpu"]
    changes = [
        (selfcheck, "kernel_source_hash", lambda name: "0123456789abcdef"),
        (torch, "__version__", "9.99.0"),
        (selfcheck, "device_identity", lambda device: {"device": "cpu", "name": "another CPU", "arch": "x86_64"}),
    ]
    for i, (owner, attr, value) in enumerate(changes):
        monkeypatch.setattr(owner, attr, value)
        backends.reset_first_use_state()
        backends.resolve_backend(None, CPU)
        assert check_runs == ["cpu"] * (i + 2), attr
    key = selfcheck.cache_key("triton", CPU)
    assert {"kernel_source_hash", "torch", "triton", "triton_interpret", "arch", "name"} <= set(key)


def test_the_kernel_source_hash_follows_the_files(tmp_path, monkeypatch):
    (tmp_path / "triton_kernels.py").write_text("x = 1\n")
    monkeypatch.setattr(selfcheck, "_PACKAGE", str(tmp_path))
    before = selfcheck.kernel_source_hash("triton")
    (tmp_path / "triton_kernels.py").write_text("x = 22\n")  # another size: the digest is cached by size and mtime
    assert selfcheck.kernel_source_hash("triton") != before


@needs_cpu_backend
def test_check_off_runs_nothing(check_runs, tmp_path, monkeypatch):
    monkeypatch.setenv(selfcheck.ENV_FIRST_USE, "0")
    monkeypatch.setenv(selfcheck.ENV_PERTURB, "cpu:loss")  # would fail, were it run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve_backend(None, CPU).name == "cpu"
        _loss("cpu")
    assert check_runs == [] and _self_warnings(caught) == []
    assert not (tmp_path / "cache").exists()


@needs_cpu_backend
def test_after_first_use_the_choice_is_a_dict_lookup(first_use, monkeypatch):
    backends.resolve_backend(None, CPU)

    def no_disk(*args, **kwargs):
        raise AssertionError("the cache was read again")

    monkeypatch.setattr(selfcheck, "load_verdict", no_disk)
    monkeypatch.setattr(selfcheck, "first_use_check", no_disk)
    for _ in range(3):
        assert backends.resolve_backend(None, CPU).name == "cpu"
        backends.resolve_backend("cpu", CPU)


def test_an_unreadable_cache_file_means_check_again(tmp_path):
    key = selfcheck.cache_key("cpu", CPU)
    path = selfcheck._cache_path(key)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write('{"key": ')  # cut short
    assert selfcheck.load_verdict("cpu", CPU) is None


def test_the_report_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    selfcheck.write_json_atomically(str(path), {"a": 1.0})

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(selfcheck.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        selfcheck.write_json_atomically(str(path), {"a": 2.0})
    assert json.loads(path.read_text()) == {"a": 1.0}
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left
    assert json.loads(selfcheck.to_json({"e": float("inf")})) == {"e": "inf"}  # strict JSON


@needs_cpu_backend
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast"])
def test_a_first_call_without_autograd_still_checks_properly(context, first_use, check_runs):
    """The first loss call may be an evaluation (no_grad, inference_mode) or under autocast: the check inside it
    still runs its backward passes in full precision, and the backend passes."""
    enter = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
             "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[context]
    x = make_inputs([3, 1, 2], 5, 16, seed=3, gaze="mixed", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with enter():
            ek.fine_grained_loss(**x)
    assert _self_warnings(caught) == [] and check_runs == ["cpu"]
    assert backends.resolve_backend(None, CPU).name == "cpu"
    assert torch.is_grad_enabled()


def test_a_check_that_cannot_run_warns_and_trusts(first_use, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("no home folder")

    monkeypatch.setattr(selfcheck, "first_use_check", broken)
    name = ek.available_backends("cpu", auto=True)[0]
    with pytest.warns(backends.SelfCheckWarning, match="could not run .OSError: no home folder"):
        assert backends.resolve_backend(None, CPU).name == name


def test_a_case_refused_by_design_is_skipped_not_failed(monkeypatch):
    """A smaller GPU (99 KiB of shared memory per block) refuses the triton backend's 70-sentence reports with a
    clear error: the self-check says so and does not fail the backend for it."""
    tb = pytest.importorskip("egma_kernels.triton_backend")
    if tb.triton is None:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(tb, "_shared_memory", lambda device: 99 * 1024)
    long_case = [c for c in selfcheck.FULL_CASES if c.name == "long report (70)"][0]
    cuda = torch.device("cuda")
    assert "refused by design" in selfcheck.beyond_limits("triton", long_case, torch.bfloat16, cuda)
    assert selfcheck.beyond_limits("triton", selfcheck.FULL_CASES[0], torch.bfloat16, cuda) is None
    assert selfcheck.beyond_limits("cuda", long_case, torch.bfloat16, cuda) is None
    record = selfcheck.run_case("triton", long_case, torch.bfloat16, cuda)  # nothing runs: no GPU needed
    assert record["ok"] and "refused by design" in record["skipped"]


@needs_cpu_backend
def test_a_run_cut_short_leaves_the_cases_it_checked(tmp_path, monkeypatch):
    """The report is rewritten after each case: a self-check stopped midway (a time limit) leaves a readable
    report of what it ran, marked incomplete."""
    report = tmp_path / "report.json"
    run_case = selfcheck.run_case
    calls = []

    def stop_at_the_fourth(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args)
        return run_case(*args)

    monkeypatch.setattr(selfcheck, "run_case", stop_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--selfcheck", "--device", "cpu", "--providers", "cpu", "--report", str(report), "--quiet"])
    partial = json.loads(report.read_text())
    assert partial["complete"] is False
    assert partial["backends"]["cpu"]["verdict"] == "RUNNING" and len(partial["backends"]["cpu"]["cases"]) == 3


def test_an_unwritable_report_is_refused_before_checking(tmp_path, capsys, check_runs):
    (tmp_path / "file").write_text("")
    rc = cli.main(["--selfcheck", "--device", "cpu", "--report", str(tmp_path / "file" / "r.json")])
    assert rc == 2 and "cannot write the report" in capsys.readouterr().err
    assert check_runs == []


@needs_cpu_backend
def test_a_check_whose_backend_raised_is_not_cached(first_use, check_runs, tmp_path, monkeypatch):
    """A case that raised (out of memory, say) fails the check for this process only: the next checks again."""
    run = selfcheck._run

    def out_of_memory(x, name, *args):
        if name == "cpu":
            raise RuntimeError("out of memory")
        return run(x, name, *args)

    monkeypatch.setattr(selfcheck, "_run", out_of_memory)
    with pytest.warns(backends.SelfCheckWarning, match="raised RuntimeError: out of memory"):
        assert backends.resolve_backend(None, CPU).name == "reference"
    assert not (tmp_path / "cache" / "selfcheck").exists() or not os.listdir(tmp_path / "cache" / "selfcheck")
    monkeypatch.setattr(selfcheck, "_run", run)
    backends.reset_first_use_state()
    assert backends.resolve_backend(None, CPU).name == "cpu"
    assert check_runs == ["cpu", "cpu"]
