"""The benchmark harness (egma-bench): the smoke sweep runs and its outputs are well formed and correct."""

import json
import os

import pytest
import torch

from egma_kernels import cli_support
from egma_kernels.bench import cli
from egma_kernels.bench.loop import loop_filip_similarity, loop_fine_grained_loss
from egma_kernels.bench.report import markdown_table, read_jsonl
from egma_kernels.bench.sweeps import SIZES, SWEEPS, parse_size

from conftest import make_inputs

TIME_FIELDS = ("median_ms", "p20_ms", "p80_ms", "runs")
COMMON_FIELDS = (
    "schema", "run_id", "sweep", "kind", "size", "B", "P", "D", "R", "N", "S_max", "lengths", "dtype", "provider",
    "mode", "status", "device", "device_name", "torch_version", "triton_version", "cuda_version", "package_version",
    "timestamp", "input_bytes",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # --no-compile keeps the CI run to seconds; reference-compiled is exercised below on its own.
    rc = cli.main(["--smoke", "--device", "cpu", "--no-compile", "--quiet", "--out", str(out)])
    records = read_jsonl(os.path.join(out, "results.jsonl"))
    return rc, records, out


def _ok(records, **match):
    return [r for r in records if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())]


def test_smoke_runs_and_writes_outputs(smoke):
    rc, records, out = smoke
    assert rc == 0, [r for r in records if r["status"] == "error"]
    assert records
    table = open(os.path.join(out, "results.md")).read()
    assert "| size | dtype | provider |" in table and "floor (matmul)" in table
    for r in records:
        for f in COMMON_FIELDS:
            assert f in r, (f, r)
        assert r["status"] in ("ok", "skipped", "oom", "error")
        assert r["schema"] == "egma-bench/1"
    providers = {r["provider"] for r in records}
    assert {"loop", "reference", "floor (matmul)"} <= providers
    # every available fused backend on the CPU took part (the Triton interpreter excepted)
    import egma_kernels as ek

    for b in ek.available_backends("cpu"):
        if b != "triton":
            assert b in providers


def test_smoke_measurements(smoke):
    _, records, _ = smoke
    ok = [r for r in records if r["status"] == "ok"]
    for r in ok:
        for f in TIME_FIELDS:
            assert f in r
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["floor_ms"] > 0 and r["floor_ratio"] > 0
        if r["provider"] != "floor (matmul)":
            assert r["scratch_bytes"] >= 0
            assert r["peak_bytes"] == r["scratch_bytes"] + r["input_bytes"]
            assert r["memory_method"]
            assert r["max_abs_err"] is not None
    modes = {(r["kind"], r["mode"]) for r in ok if r["provider"] == "reference"}
    assert modes == {("loss", "forward"), ("loss", "backward"), ("loss", "full"), ("similarity", "forward")}


def test_reference_error_is_tiny(smoke):
    _, records, _ = smoke
    for r in _ok(records, provider="reference"):
        if r["dtype"] == "float64":  # the same computation (up to the order of parallel sums)
            assert r["max_abs_err"] <= 1e-12
            assert (r.get("max_rel_grad_err") or 0.0) <= 1e-12
        else:
            assert r["max_abs_err"] < 1e-4
            if r["kind"] == "loss":
                assert r["max_rel_grad_err"] < 1e-4


def test_loop_matches_reference_in_float64(smoke):
    """loop = docs/loss.md with egma_compat=True for the first two terms (here: every term, and gradients)."""
    _, records, _ = smoke
    loop64 = _ok(records, provider="loop", dtype="float64")
    assert {r["kind"] for r in loop64} == {"loss", "similarity"}
    for r in loop64:
        assert r["egma_compat"] is True
        terms = r["err_terms"]
        if r["kind"] == "loss":
            assert terms["contrastive"] <= 1e-9 and terms["gaze_mlce"] <= 1e-9
            assert r["max_rel_grad_err"] <= 1e-9
        assert r["max_abs_err"] <= 1e-9


@pytest.mark.parametrize("case", [((3, 1, 4, 2, 5), 7, "mixed"), ((17, 3, 1), 3, "all"), ((2, 2), 4, "none"), ((1, 1, 1), 5, "all")])
def test_loop_against_reference_direct(case):
    import egma_kernels as ek

    lengths, P, gaze = case
    inputs = make_inputs(list(lengths), P, 16, seed=3, gaze=gaze)

    def run(fn, **kw):
        args = dict(inputs)
        for k in ("patch_emb", "sent_emb", "logit_scale"):
            args[k] = inputs[k].clone().requires_grad_(True)
        terms = fn(**args, **kw)
        terms.loss.backward()
        return terms, [args[k].grad for k in ("patch_emb", "sent_emb", "logit_scale")]

    ref, ref_grads = run(ek.fine_grained_loss, egma_compat=True, backend="reference", return_details=True)
    loop, loop_grads = run(loop_fine_grained_loss)
    for a, b in zip(ref, loop):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-9)
    for a, b in zip(ref_grads, loop_grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-9)
    i2t, t2i = loop_filip_similarity(inputs["patch_emb"], inputs["sent_emb"], inputs["cu_seqlens"], inputs["logit_scale"])
    torch.testing.assert_close(i2t, ref.i2t.detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(t2i, ref.t2i.detach(), rtol=0, atol=1e-9)


def test_cli_options(tmp_path, capsys):
    assert cli.main(["--list", "--device", "cpu"]) == 0
    listing = capsys.readouterr().out
    assert "egma" in listing and "loop" in listing and "reference" in listing
    assert cli.main(["--providers", "nope", "--device", "cpu"]) == 2
    assert cli.main(["--modes", "sideways", "--device", "cpu"]) == 2
    jsonl = tmp_path / "r.jsonl"
    rc = cli.main([
        "--sizes", "loss:B=3,P=4,D=8,max_sent=3", "--providers", "reference", "--modes", "forward",
        "--dtypes", "float32", "--repeats", "2", "--quiet", "--no-memory", "--jsonl", str(jsonl),
    ])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| reference |" in table
    recs = [json.loads(l) for l in jsonl.read_text().splitlines()]
    assert [r["provider"] for r in recs] == ["floor (matmul)", "reference"]
    assert recs[1]["mode"] == "forward" and "scratch_bytes" not in recs[1]
    # --no-compat: the loop provider is skipped, with the reason recorded
    rc = cli.main(["--sizes", "tiny", "--providers", "loop", "--modes", "full", "--no-compat", "--quiet", "--jsonl", "-"])
    assert rc == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    loop = [r for r in lines if r["provider"] == "loop"]
    assert loop and loop[0]["status"] == "skipped" and "egma_compat" in loop[0]["reason"]


def test_budget_skips_the_rest(capsys):
    rc = cli.main(["--sizes", "tiny,tiny-retrieval", "--providers", "reference", "--budget", "0", "--quiet", "--jsonl", "-"])
    assert rc == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert lines == [] or all(r["status"] == "skipped" for r in lines if r["provider"] != "floor (matmul)")


def test_compiled_reference_smoke():
    """reference-compiled at the tiny size (torch.compile needs a C++ compiler; skipped without one)."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler for torch.compile")
    from egma_kernels.bench import harness
    from egma_kernels.bench.providers import CompiledReferenceProvider, LossOptions

    cfg = harness.RunConfig(
        sizes=[SIZES["tiny"]], providers=[CompiledReferenceProvider()], modes=("full",), repeats=1, warmup=0,
        min_repeats=1, measure_memory=False, options=LossOptions(egma_compat=True),
    )
    records = harness.run(cfg)
    rec = [r for r in records if r["provider"] == "reference-compiled"][0]
    assert rec["status"] == "ok", rec
    assert rec["max_abs_err"] < 1e-4


def test_sizes_and_sweeps():
    assert SIZES["egma"].B == 40 and SIZES["egma"].P == 49 and SIZES["egma"].D == 512
    assert (SIZES["egma"].min_sent, SIZES["egma"].max_sent) == (1, 10)
    assert SIZES["retrieval"].B == 1600 and SIZES["retrieval"].R == 40
    assert {"cpu", "gpu", "smoke"} <= set(SWEEPS)
    s = parse_size("similarity:B=10,P=4,reports=3")
    assert s.kind == "similarity" and s.R == 3
    with pytest.raises(ValueError):
        parse_size("nonsense")
    assert markdown_table([]).strip()


def test_render_saved_results(smoke, capsys):
    _, records, out = smoke
    assert cli.main(["--render", os.path.join(out, "results.jsonl")]) == 0
    table = capsys.readouterr().out
    assert table == open(os.path.join(out, "results.md")).read()


@pytest.mark.gpu
def test_smoke_on_cuda(tmp_path):
    """The CUDA path of the harness: CUDA-event timing, allocator memory, every CUDA backend against float64."""
    import egma_kernels as ek

    rc = cli.main(["--smoke", "--device", "cuda", "--quiet", "--out", str(tmp_path)])
    records = read_jsonl(os.path.join(tmp_path, "results.jsonl"))
    assert rc == 0, [r for r in records if r["status"] == "error"]
    ok = [r for r in records if r["status"] == "ok"]
    assert ok and all(r["device"] == "cuda" for r in records)
    for b in ek.available_backends("cuda"):
        assert any(r["provider"] == b for r in ok), b
    for r in ok:
        if r["provider"] != "floor (matmul)":
            assert "cuda" in r["memory_method"] and r["scratch_bytes"] >= 0
        if r["dtype"] == "float64" and r["provider"] in ("loop", "reference"):
            assert r["max_abs_err"] <= 1e-9


def test_smoke_table_names_the_winner(smoke):
    _, records, out = smoke
    table = open(os.path.join(out, "results.md")).read()
    assert "Fastest provider per size and mode" in table
    assert "- tiny float32 fwd+bwd: fastest **" in table


def test_winner_lines():
    from egma_kernels.bench.report import winner_lines

    def rec(provider, ms, mode="full", size="egma", status="ok"):
        return dict(provider=provider, median_ms=ms, mode=mode, size=size, dtype="float32", kind="loss", status=status)

    lines = winner_lines([rec("floor (matmul)", 1.0, mode="forward"), rec("loop", 80.0), rec("reference", 40.0),
                          rec("cpu", 10.0), rec("reference-compiled", 20.0), rec("cuda", 1.0, status="error"),
                          rec("reference", 5.0, mode="forward"), rec("cpu", 4.9, mode="forward")])
    assert lines[0] == ("- egma float32 fwd+bwd: fastest **cpu** 10.0 ms, 4.0x faster than reference (40.0 ms), "
                        "2.0x faster than the next, reference-compiled (20.0 ms)")
    assert lines[1] == "- egma float32 fwd: fastest **cpu** 4.90 ms, about as fast as reference (5.00 ms)"
    assert len(lines) == 2


def test_plot_dependency_checked_before_measuring(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    rc = cli.main(["--sizes", "tiny", "--providers", "reference", "--plot"])
    captured = capsys.readouterr()
    assert rc == 2 and "--plot needs matplotlib" in captured.err
    assert captured.out == "" and "floor" not in captured.err  # nothing was measured


def test_default_threads_follow_the_idle_cores(monkeypatch):
    monkeypatch.setattr(cli_support.os, "cpu_count", lambda: 2)
    for idle, default, want in ((0.0, 2, 1), (0.9, 2, 1), (1.9, 2, 2), (7.5, 2, 2), (3.0, 8, 3)):
        monkeypatch.setattr(cli_support, "idle_cores", lambda sample_s=0.5, v=idle: v)
        threads, why = cli_support.choose_threads(default)
        assert threads == want, (idle, default, threads)
        assert f"{threads} of torch's {default}" in why
    monkeypatch.setattr(cli_support, "idle_cores", lambda sample_s=0.5: None)
    monkeypatch.setattr(cli_support.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert cli_support.choose_threads(2)[0] == 1
    idle = cli_support.idle_cores(0.05)  # the real sampler: a number of cores, or None without /proc/stat
    assert idle is None or 0.0 <= idle <= 2.0 + 1e-6


def test_library_warnings_are_held_back_and_counted():
    import io
    import warnings

    from egma_kernels.bench.harness import Progress

    stream = io.StringIO()
    progress = Progress(1, stream=stream)
    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        with cli._library_messages_held(progress):
            warnings.warn("deprecated thing", FutureWarning)
            warnings.warn("deprecated thing", FutureWarning)
    assert outer == []  # nothing reached the caller's warnings
    assert "2 library warning(s) held back, 1 distinct; first: FutureWarning: deprecated thing" in stream.getvalue()


def test_heartbeat_while_a_step_runs():
    import io
    import re
    import time

    from egma_kernels.bench.harness import Progress

    stream = io.StringIO()
    progress = Progress(1, stream=stream, heartbeat_s=0.2)
    progress.working_on("egma float32 reference-compiled")
    time.sleep(1.5)
    progress.close()
    assert re.search(r"still running after \d+ s: egma float32 reference-compiled", stream.getvalue())


def test_held_back_warning_line_is_cut_at_a_word_boundary():
    import io
    import warnings

    from egma_kernels.bench.harness import Progress

    message = "TensorFloat32 tensor cores for float32 matrix multiplication available but not enabled. Consider setting"
    stream = io.StringIO()
    with cli._library_messages_held(Progress(1, stream=stream)):
        warnings.warn(message + " `torch.set_float32_matmul_precision('high')`", UserWarning)
    line = stream.getvalue().strip().splitlines()[-1]
    shown = line.split("first: UserWarning: ", 1)[1]
    assert shown.endswith(" ...")
    assert message.startswith(shown[: -len(" ...")]) and message[len(shown) - len(" ...")] == " "


def test_triton_unavailability_says_why(monkeypatch):
    """unavailable_backends() names the cause for triton: no CUDA device, Triton missing or too old, import error."""
    from egma_kernels import _optional_backends as ob, backends

    tb = pytest.importorskip("egma_kernels.triton_backend")
    monkeypatch.setattr(tb, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if tb.triton is not None:
        assert "no CUDA device is visible" in backends.unavailable_backends()["triton"]
    missing = ModuleNotFoundError("No module named 'triton'", name="triton")
    monkeypatch.setattr(tb, "triton", None)
    monkeypatch.setattr(tb, "_TRITON_IMPORT_ERROR", missing)
    assert "Triton is not installed" in backends.unavailable_backends()["triton"]
    monkeypatch.setattr(tb, "_TRITON_IMPORT_ERROR", ImportError("libcuda.so.1: cannot open shared object file"))
    why = ob.triton_why_unavailable()
    assert why == "Triton failed to import (ImportError: libcuda.so.1: cannot open shared object file)"
    monkeypatch.setattr(tb, "triton", type("FakeTriton", (), {"__version__": "3.1.0"}))
    assert ob.triton_why_unavailable() == "Triton 3.1.0 is too old; the kernels need Triton >= 3.6"
