import sys, torch
sys.path.insert(0, "tests")
import egma_kernels as ek
from conftest import make_inputs
from torch.utils import benchmark as tb

print(torch.__version__, torch.cuda.get_device_name(), ek.available_backends("cuda"), ek.compiled.build_info(), flush=True)
g = torch.Generator().manual_seed(0)
for (B, P, D) in ((40, 49, 512),):
    lengths = torch.randint(1, 11, (B,), generator=g).tolist()
    for dtype in (torch.float32, torch.bfloat16):
        inp = make_inputs(lengths, P, D, dtype=dtype)
        inp = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
        p = inp["patch_emb"].requires_grad_()
        s = inp["sent_emb"].requires_grad_()
        for be in ("reference", "triton", "cuda"):
            try:
                def fwd():
                    with torch.no_grad():
                        ek.fine_grained_loss(p, s, inp["cu_seqlens"], inp["logit_scale"], inp["gaze"], backend=be, validate=False)
                def fb():
                    ek.fine_grained_loss(p, s, inp["cu_seqlens"], inp["logit_scale"], inp["gaze"], backend=be, validate=False).backward()
                fb(); torch.cuda.synchronize()
                r = []
                for f in (fwd, fb):
                    r.append(tb.Timer("f()", globals={"f": f}).blocked_autorange(min_run_time=0.3).median * 1e3)
                print(f"B{B} P{P} D{D} N{sum(lengths)} {str(dtype):15s} {be:10s} fwd {r[0]:.3f} ms  fwd+bwd {r[1]:.3f} ms", flush=True)
            except Exception as e:
                print(be, "failed:", repr(e)[:300], flush=True)
