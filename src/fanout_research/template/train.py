"""train.py: the one file a proposal edits. Train a small GPT for a fixed wall-clock budget,
then report val_bpb (lower is better) from prepare.py's fixed evaluation.

Knobs are the UPPERCASE literal assignments below. They are written at the GPU scale
(autoresearch-sized: depth 8, width 512, sequence 2048, ~50M parameters). A hardware profile,
picked at start-up, says how to run them: dtype, attention kernel, compile, and three scale
factors (width, sequence, batch) that shrink the same knobs for a T4 or a CPU. Every knob
therefore reaches every profile: DEPTH 8 -> 10 means ten layers on an H100 and on a laptop.

Environment: FANOUT_DATA_DIR (prepared data, read-only), FANOUT_TIME_BUDGET_S (training
seconds, default 300; start-up, compilation and evaluation are not counted), FANOUT_PROFILE
(overrides PROFILE), FANOUT_JOB_NAME, FANOUT_DRY_RUN=N (validation: N steps, print
`fanout-dry-run loss=...`, no budget, no eval). Exit 0 = finished, 2 = bad setup, 3 = diverged.
"""

import time

T_START = time.time()

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import numpy as np  # noqa: E402
import prepare  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

# ----------------------------------------------------------------------------- knobs
PROFILE = "auto"          # auto | h100 | ampere | t4 | cpu (FANOUT_PROFILE wins)
DEPTH = 8                 # transformer blocks
ASPECT_RATIO = 64         # model width = DEPTH * ASPECT_RATIO * profile width factor
HEAD_DIM = 128            # scaled by the profile width factor too
MLP_RATIO = 4             # hidden width of the ReLU^2 MLP, relative to the model width
SEQ_LEN = 2048            # context length (scaled by the profile sequence factor)
TOTAL_BATCH_SIZE = 524288  # tokens per optimizer step (scaled by the profile batch factor)
MATRIX_LR = 0.04          # Muon learning rate for the block matrices
EMBEDDING_LR = 0.6        # Adam learning rate for the token embedding
UNEMBEDDING_LR = 0.004    # Adam learning rate for the output head
WEIGHT_DECAY = 0.1        # decoupled weight decay on the block matrices
ADAM_BETA1 = 0.8
ADAM_BETA2 = 0.95
MUON_MOMENTUM = 0.95
WARMUP_RATIO = 0.0        # share of the time budget spent ramping the learning rate up
WARMDOWN_RATIO = 0.5      # share of the time budget at the end spent ramping it down
FINAL_LR_FRAC = 0.0       # learning-rate multiplier reached at the end of the warmdown
LOGIT_SOFTCAP = 15.0      # logits = cap * tanh(logits / cap)
SEED = 1337
COMPILE = "auto"          # auto (GPU only) | on | off

# Hardware profiles. width/seq/batch scale the knobs above; device_batch is the most
# sequences per micro-step (gradient accumulation covers the rest); peak_flops feeds MFU.
PROFILES = {
    "h100": {"dtype": "bfloat16", "attention": "flash", "width": 1.0, "seq": 1.0,
             "batch": 1.0, "device_batch": 64, "peak_flops": 989.5e12, "untimed_steps": 3},
    "ampere": {"dtype": "bfloat16", "attention": "flash", "width": 1.0, "seq": 1.0,
               "batch": 1.0, "device_batch": 32, "peak_flops": 312e12, "untimed_steps": 3},
    "t4": {"dtype": "float16", "attention": "efficient", "width": 0.5, "seq": 0.125,
           "batch": 0.125, "device_batch": 128, "peak_flops": 65e12, "untimed_steps": 3},
    "cpu": {"dtype": "float32", "attention": "flash", "width": 0.125, "seq": 0.0625,
            "batch": 0.00390625, "device_batch": 0, "peak_flops": 0.0, "untimed_steps": 1},
}
PEAK_FLOPS_BY_NAME = {"H100": 989.5e12, "H200": 989.5e12, "H800": 989.5e12, "A100": 312e12,
                      "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "T4": 65e12}
ATTENTION = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH}


class SetupError(Exception):
    """A configuration problem; the message is one line and names the fix."""


# ----------------------------------------------------------------------------- hardware
def choose_profile() -> tuple[str, dict, torch.device]:
    """The profile from FANOUT_PROFILE, PROFILE, or the GPU's compute capability."""
    name = os.environ.get("FANOUT_PROFILE") or PROFILE
    where = "FANOUT_PROFILE" if os.environ.get("FANOUT_PROFILE") else "PROFILE in train.py"
    if name == "auto":
        if not torch.cuda.is_available():
            name = "cpu"
        else:
            major, _ = torch.cuda.get_device_capability()
            gpu = torch.cuda.get_device_name()
            name = "t4" if major < 8 else "h100" if "H1" in gpu or "H2" in gpu else "ampere"
    if name not in PROFILES:
        raise SetupError(f"unknown profile {name!r} (from {where}); use one of: auto, "
                         + ", ".join(PROFILES))
    if name != "cpu" and not torch.cuda.is_available():
        raise SetupError(f"profile {name!r} (from {where}) needs a CUDA GPU and none is "
                         "visible; use FANOUT_PROFILE=cpu or auto")
    prof = dict(PROFILES[name])
    if name != "cpu":
        gpu = torch.cuda.get_device_name()
        prof["peak_flops"] = next((v for k, v in PEAK_FLOPS_BY_NAME.items() if k in gpu),
                                  prof["peak_flops"])
        memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        if name == "ampere" and memory_gb < 60:  # A10/L4-class cards: smaller micro-batches
            prof["device_batch"] = max(4, int(prof["device_batch"] * memory_gb / 80))
    return name, prof, torch.device("cuda" if name != "cpu" else "cpu")


def pick_attention(prof: dict, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Use the profile's SDPA kernel if it runs here, else fall back (flash -> efficient -> math)."""
    order = ["flash", "efficient", "math"]
    for kernel in order[order.index(prof["attention"]):]:
        q = torch.randn(1, 2, 16, head_dim, device=device, dtype=dtype)
        try:
            with sdpa_kernel([ATTENTION[kernel]]):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            return kernel
        except RuntimeError:
            continue
    return "math"


# ----------------------------------------------------------------------------- model
def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fc = nn.Linear(dim, MLP_RATIO * dim, bias=False)
        self.out = nn.Linear(MLP_RATIO * dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(rms_norm(x)).view(B, T, 3, self.n_heads, -1).unbind(2)
        q, k = rotary(rms_norm(q), cos, sin), rotary(rms_norm(k), cos, sin)  # QK-norm + RoPE
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.relu(self.fc(rms_norm(x))).square())


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, depth: int, n_heads: int, seq_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(depth))
        self.head = nn.Linear(dim, vocab, bias=False)
        half = dim // n_heads // 2
        freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
        angle = torch.outer(torch.arange(seq_len, dtype=torch.float32), freq)
        self.register_buffer("cos", angle.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angle.sin()[None, :, None, :], persistent=False)
        nn.init.normal_(self.embed.weight, std=1.0)
        for block in self.blocks:
            for lin in (block.qkv, block.fc):
                nn.init.uniform_(lin.weight, -(3 / dim) ** 0.5, (3 / dim) ** 0.5)
            nn.init.zeros_(block.proj.weight)  # residual branches start as identity
            nn.init.zeros_(block.out.weight)
        nn.init.zeros_(self.head.weight)  # untrained model predicts uniformly: loss = ln(vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.size(1)
        x = rms_norm(self.embed(idx))
        cos, sin = self.cos[:, :T].to(x.dtype), self.sin[:, :T].to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(rms_norm(x)).float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ----------------------------------------------------------------------------- optimizer
def orthogonalize(g: torch.Tensor, dtype: torch.dtype, steps: int = 5) -> torch.Tensor:
    """Approximate U V^T of g's SVD with a quintic Newton-Schulz iteration (as in Muon)."""
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.mT
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        a = x @ x.mT
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update for each matrix is orthogonalized: every direction moves."""

    def __init__(self, params: list, lr: float, momentum: float, weight_decay: float,
                 ns_dtype: torch.dtype) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = orthogonalize(p.grad.lerp(buf, group["momentum"]), self.ns_dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def lr_multiplier(progress: float) -> float:
    """Warmup, constant, then linear warmdown to FINAL_LR_FRAC, as a share of the budget."""
    if WARMUP_RATIO > 0 and progress < WARMUP_RATIO:
        return (progress + 1e-3) / WARMUP_RATIO
    if WARMDOWN_RATIO > 0 and progress > 1 - WARMDOWN_RATIO:
        frac = (1 - progress) / WARMDOWN_RATIO
        return FINAL_LR_FRAC + (1 - FINAL_LR_FRAC) * max(frac, 0.0)
    return 1.0


# ----------------------------------------------------------------------------- data
class Batches:
    """Random windows of SEQ_LEN + 1 tokens from the memory-mapped train shards."""

    def __init__(self, data: prepare.Data, seq_len: int, batch: int, device: torch.device) -> None:
        self.shards = [s for s in data.train if len(s) > seq_len + 1]
        if not self.shards:
            raise SetupError(f"no train shard holds more than SEQ_LEN={seq_len} tokens; "
                             "prepare more data or lower SEQ_LEN")
        sizes = np.array([len(s) for s in self.shards], dtype=np.float64)
        self.p = sizes / sizes.sum()
        self.rng = np.random.default_rng(SEED)
        self.offsets = np.arange(seq_len + 1)
        self.seq_len, self.batch, self.device = seq_len, batch, device

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        shard = self.shards[self.rng.choice(len(self.shards), p=self.p)]
        starts = self.rng.integers(0, len(shard) - self.seq_len - 1, size=self.batch)
        xy = torch.from_numpy(shard[starts[:, None] + self.offsets].astype(np.int64))
        if self.device.type == "cuda":
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]


# ----------------------------------------------------------------------------- main
def fail(message: str, code: int) -> None:
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main() -> None:
    name, prof, device = choose_profile()
    data_dir = os.path.expanduser(os.environ.get("FANOUT_DATA_DIR")
                                  or "~/.cache/fanout/data/synthetic")
    budget = float(os.environ.get("FANOUT_TIME_BUDGET_S", "300"))
    dry_run = os.environ.get("FANOUT_DRY_RUN", "").strip()
    if dry_run and not dry_run.isdigit():
        raise SetupError(f"FANOUT_DRY_RUN={dry_run!r} is not a number of steps")
    dry_run_steps = int(dry_run or 0)  # > 0: a validation run, N steps then stop (no eval)
    data = prepare.Data(data_dir, os.environ.get("FANOUT_VERIFY", "auto"))
    torch.manual_seed(SEED)
    torch.set_float32_matmul_precision("high")  # TF32 where the GPU has it
    torch.set_flush_denormal(True)  # a blown-up CPU model can otherwise crawl through eval
    dtype = getattr(torch, prof["dtype"])

    # Scale the knobs for this profile (identity on h100/ampere).
    head_dim = max(8, 2 * round(HEAD_DIM * prof["width"] / 2))
    model_dim = max(head_dim, round(DEPTH * ASPECT_RATIO * prof["width"] / head_dim) * head_dim)
    seq_len = max(16, round(SEQ_LEN * prof["seq"]))
    seqs_per_step = max(1, round(TOTAL_BATCH_SIZE * prof["batch"]) // seq_len)
    accum = math.ceil(seqs_per_step / (prof["device_batch"] or seqs_per_step))
    device_batch = seqs_per_step // accum
    tokens_per_step = device_batch * accum * seq_len

    model = GPT(data.vocab_size, model_dim, DEPTH, model_dim // head_dim, seq_len).to(device)
    attention = pick_attention(prof, device, dtype, head_dim)
    compile_on = COMPILE == "on" or (COMPILE == "auto" and device.type == "cuda")
    step_model = torch.compile(model) if compile_on else model
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    adam_scale = (model_dim / 768) ** -0.5  # Adam step sizes shrink with width
    adam = torch.optim.AdamW(
        [{"params": [model.embed.weight], "lr": EMBEDDING_LR * adam_scale},
         {"params": [model.head.weight], "lr": UNEMBEDDING_LR * adam_scale}],
        betas=(ADAM_BETA1, ADAM_BETA2), eps=1e-10, weight_decay=0.0, fused=device.type == "cuda")
    muon = Muon(matrices, MATRIX_LR, MUON_MOMENTUM, WEIGHT_DECAY,
                torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    optimizers = [adam, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]

    n_params = sum(p.numel() for p in model.parameters())
    # 6 FLOPs per parameter per token in matmuls (the embedding lookup is free) + attention.
    flops_per_token = 6 * (n_params - model.embed.weight.numel()) + 12 * DEPTH * model_dim * seq_len
    batches = Batches(data, seq_len, device_batch, device)
    print(f"profile {name} on {device} | {prof['dtype']} | attention {attention} | "
          f"compile {compile_on} | {n_params / 1e6:.2f}M params | depth {DEPTH} width "
          f"{model_dim} heads {model_dim // head_dim} | seq {seq_len} | {tokens_per_step} "
          f"tokens/step ({device_batch}x{accum}) | data {data.check['level']} check "
          f"{data.check['seconds']:.2f}s | budget {budget:.0f}s", flush=True)

    step, train_time, timed_tokens, loss_f = 0, 0.0, 0, float("nan")
    explode = 3 * math.log(data.vocab_size)
    next_log = 0.0
    t_loop = time.time()
    with sdpa_kernel([ATTENTION[attention]]):
        while True:
            t0 = time.perf_counter()
            lrm = lr_multiplier(min(train_time / budget, 1.0)) if budget > 0 else 1.0
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
            try:
                for _ in range(accum):
                    x, y = batches.next()
                    with autocast:
                        loss = step_model(x, y)
                    scaler.scale(loss / accum).backward()
            except Exception as exc:  # a compiler failure on the first step: go on eager
                if step > 0 or step_model is model:
                    raise
                print(f"warning: torch.compile failed ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); running eager", file=sys.stderr, flush=True)
                step_model, compile_on = model, False
                model.zero_grad(set_to_none=True)
                continue
            for opt in optimizers:
                scaler.unscale_(opt)
                scaler.step(opt)
            scaler.update()
            model.zero_grad(set_to_none=True)
            loss_f = loss.item()  # also a device sync, so the timing below is honest
            if not math.isfinite(loss_f) or loss_f > explode:
                fail(f"training diverged at step {step}: loss {loss_f:.4g} (uniform guess is "
                     f"{math.log(data.vocab_size):.2f}); lower MATRIX_LR / EMBEDDING_LR / "
                     "UNEMBEDDING_LR or raise WARMUP_RATIO", 3)
            dt = time.perf_counter() - t0
            step += 1
            if step > prof["untimed_steps"]:  # warm-up / compile steps are not on the clock
                train_time += dt
                timed_tokens += tokens_per_step
            if train_time >= next_log:
                print(f"step {step:05d} | loss {loss_f:.4f} | lrm {lrm:.2f} | "
                      f"{dt * 1e3:.0f} ms | {tokens_per_step / dt:,.0f} tok/s | "
                      f"{train_time:.1f}/{budget:.0f}s", flush=True)
                next_log += max(budget / 10, 1.0)
            if dry_run_steps and step >= dry_run_steps:
                print(f"fanout-dry-run loss={loss_f:.6f} steps={step}", flush=True)
                return
            if train_time >= budget:
                break

        model.eval()
        t_eval = time.time()
        eval_tokens = prepare.EVAL_TOKENS[name]
        eval_batch = max(1, min(device_batch, 2**30 // (seq_len * data.vocab_size * 4)))
        val_bpb, scored = prepare.evaluate_bpb(model, data, seq_len, eval_batch, device,
                                               autocast, eval_tokens)
    eval_seconds = time.time() - t_eval
    if not math.isfinite(val_bpb):
        fail(f"evaluation gave val_bpb {val_bpb} (train loss {loss_f:.4g}); the model is "
             "numerically broken: lower the learning rates", 3)
    scored_bytes = int(data.token_bytes[np.asarray(data.val[1 : scored + 1])].sum())
    scored_targets = int((data.token_bytes[np.asarray(data.val[1 : scored + 1])] > 0).sum())
    uniform_bpb = scored_targets * math.log2(data.vocab_size) / max(scored_bytes, 1)

    peak_vram = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    mfu = (100 * flops_per_token * timed_tokens / train_time / prof["peak_flops"]
           if prof["peak_flops"] and train_time > 0 else 0.0)
    result = {
        "val_bpb": round(val_bpb, 6), "training_seconds": round(train_time, 1),
        "total_seconds": round(time.time() - T_START, 1), "peak_vram_mb": round(peak_vram, 1),
        "mfu_percent": round(mfu, 2), "total_tokens_M": round(step * tokens_per_step / 1e6, 3),
        "num_steps": step, "num_params_M": round(n_params / 1e6, 3), "depth": DEPTH,
        "profile": name, "dtype": prof["dtype"], "attention": attention, "compiled": compile_on,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model_dim": model_dim, "n_heads": model_dim // head_dim, "seq_len": seq_len,
        "tokens_per_step": tokens_per_step, "vocab_size": data.vocab_size,
        "final_train_loss": round(loss_f, 4), "uniform_bpb": round(uniform_bpb, 6),
        "eval_tokens": scored, "eval_seconds": round(eval_seconds, 2),
        "startup_seconds": round(t_loop - T_START, 2), "data_check": data.check["level"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(), "job": os.environ.get("FANOUT_JOB_NAME", ""),
    }
    print("---")
    for key in ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth"):
        value = result[key]
        text = f"{value:.6f}" if key == "val_bpb" else f"{value:.2f}" if key == "mfu_percent" \
            else f"{value:.1f}" if isinstance(value, float) else str(value)
        print(f"{key + ':':<18}{text}")
    print("fanout-result " + json.dumps(result, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    try:
        main()
    except (SetupError, prepare.DataError) as exc:
        fail(str(exc), 2)
