"""lm-evaluation-harness tasks on a model already in memory (its HF wrapper, HFLM, with a
preloaded model): the zero-shot accuracies the field reports next to perplexity.

Standard tasks fetch their data from the Hugging Face hub; local tasks (a YAML file in a
folder given as `include_path`, with `dataset_path: json`) need no network.
"""
from __future__ import annotations

import logging

from ..errors import RankwiseError

log = logging.getLogger(__name__)

STANDARD_ZERO_SHOT = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "boolq",
                      "openbookqa")


def _harness():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RankwiseError("--tasks needs the lm-evaluation-harness: pip install "
                            "'rankwise[lmeval]' (or lm_eval)") from None
    return lm_eval, TaskManager


def check_tasks(tasks: list[str], include_path: str | None = None) -> None:
    """Every task name is known to the harness (with the local tasks of include_path)."""
    _, TaskManager = _harness()
    known = set(TaskManager(include_path=include_path).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise RankwiseError(f"unknown lm-eval task(s) {unknown}"
                            + (f" (with the local tasks of {include_path})" if include_path else ""))


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | None = None,
              limit: int | None = None, num_fewshot: int | None = None,
              batch_size: int = 4) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm_eval.simple_evaluate on the preloaded model."""
    lm_eval, TaskManager = _harness()
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                                      limit=limit, task_manager=TaskManager(include_path=include_path),
                                      log_samples=False)
    except (ConnectionError, OSError) as e:
        raise RankwiseError(f"lm-eval could not load a task's data (standard tasks download it "
                            f"from the Hugging Face hub): {str(e).splitlines()[0]}") from None
    return {task: {k.split(",")[0]: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not k.startswith(("alias", "sample_len"))
                   and "_stderr" not in k}
            for task, metrics in out["results"].items()}
