"""Task: extract task vectors tau_i = theta_i - theta_0 as safetensors checkpoints."""

from __future__ import annotations

from prefect import task

from mergeflow.sources import CheckpointRef
from tasks.artifacts import ArtifactRef
from tasks.cache import ArtifactCache

POLICY = ArtifactCache(task="extract_task_vectors", kind="task_vectors",
                       code=("mergeflow.task_vectors", "mergeflow.checkpoint", "mergeflow.checkpoint_writer",
                             "tasks.task_vectors"))


@task(name="extract_task_vectors", cache_policy=POLICY, persist_result=True)
def extract_task_vectors(store: str, base: CheckpointRef, models: dict[str, CheckpointRef]) -> ArtifactRef:
    """One checkpoint dir per model (`<artifact>/<name>/`), float tensors only, plus their norms.

    The summary holds each task vector's L2 norm and the pairwise cosine similarities: a
    cheap first look at how much the tasks will interfere when merged.
    """
    slot = POLICY.slot(locals())
    if slot.done:
        return slot.done
    import torch

    from mergeflow.checkpoint import load_state_dict
    from mergeflow.checkpoint_writer import save_checkpoint
    from mergeflow.task_vectors import task_vector

    base_sd = load_state_dict(base.path)
    flat = {}
    with slot.writer() as out:
        for name, ref in sorted(models.items()):
            tau = task_vector(base_sd, load_state_dict(ref.path))
            save_checkpoint(tau, out.dir / name)
            flat[name] = torch.cat([t.reshape(-1).to(torch.float32) for _, t in sorted(tau.items())])
        names = sorted(flat)
        out.summary = {
            "models": names,
            "norm": {n: float(flat[n].norm()) for n in names},
            "cosine": {f"{a}|{b}": float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0))
                       for i, a in enumerate(names) for b in names[i + 1:]},
        }
    return out.ref
