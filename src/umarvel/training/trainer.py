"""Contrastive training of the embedder on the Hugging Face `Trainer`, with an optional GradCache step.

The trainer only encodes, computes the loss parts and logs them; DeepSpeed, FSDP, torchrun/accelerate,
bf16, checkpointing and resumption come from `Trainer` itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from umarvel.config.io import ConfigError
from umarvel.config.schema import TrainConfig
from umarvel.data.collator import Collator, EncodedBatch
from umarvel.distributed import gather
from umarvel.losses.contrastive import info_nce, matryoshka_info_nce
from umarvel.losses.distillation import distillation_kl
from umarvel.losses.distributed import world_size
from umarvel.modeling.embedder import Embedder, native_bf16

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
SIDES = ("queries", "positives", "negatives", "shortlist")


def _to_dict(batch: EncodedBatch) -> dict[str, Any]:
    return {"inputs": batch.inputs, "pooling_mask": batch.pooling_mask}


def _to_batch(chunk: dict[str, Any]) -> EncodedBatch:
    return EncodedBatch(chunk["inputs"], chunk["pooling_mask"])


class ContrastiveCollator:
    """Training examples -> chunks of backbone inputs for queries, positives and hard negatives.

    With `chunk_size` 0 each side is one chunk; otherwise chunks of at most `chunk_size` items, the
    unit GradCache embeds at a time.
    """

    def __init__(self, collator: Collator, chunk_size: int = 0) -> None:
        self.collator = collator
        self.chunk_size = chunk_size

    def _chunks(self, items: Sequence[Any]) -> list[dict[str, Any]]:
        size = self.chunk_size or len(items)
        return [_to_dict(self.collator(items[i : i + size])) for i in range(0, len(items), size)]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"queries": self._chunks([e["query"] for e in examples])}
        if examples[0].get("positive") is not None:
            batch["positives"] = self._chunks([e["positive"] for e in examples])
            batch["positive_ids"] = torch.tensor([e["positive_id"] for e in examples], dtype=torch.long)
            if "relevant_ids" in examples[0]:
                batch["relevant_ids"] = torch.tensor([e["relevant_ids"] for e in examples], dtype=torch.long)
        negatives = [n for e in examples for n in e["negatives"]]
        if negatives:
            batch["negatives"] = self._chunks(negatives)
            batch["negative_ids"] = torch.tensor([e["negative_ids"] for e in examples], dtype=torch.long)
        if "shortlist" in examples[0]:
            batch["shortlist"] = self._chunks([c for e in examples for c in e["shortlist"]])
            batch["shortlist_ids"] = torch.tensor([e["shortlist_ids"] for e in examples], dtype=torch.long)
            batch["teacher"] = torch.tensor([e["teacher"] for e in examples], dtype=torch.float32)
            batch["shortlist_valid"] = torch.tensor(
                [e["shortlist_valid"] for e in examples], dtype=torch.bool
            )
        return batch


def _scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value, gradient multiplied by `factor`."""
    return tensor * factor + tensor.detach() * (1.0 - factor)


class _EpochCallback(TrainerCallback):
    """Tell the dataset which epoch it serves, so positives are sampled per (seed, epoch, row)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(state.epoch or 0))


@dataclass
class _GradCache:
    """What GradCache's second pass needs: each chunk (its random state, its inputs) in order, the
    loss's gradient with respect to each chunk's cached embedding, and the temperature's."""

    chunks: list[tuple[_RngState, Any]]
    grads: list[torch.Tensor | None]
    log_temperature: torch.Tensor
    temperature_grad: torch.Tensor | None

    def temperature_term(self) -> torch.Tensor:
        """<log temperature, its gradient>: back-propagated with the embeddings' terms."""
        if self.temperature_grad is None:
            return torch.zeros((), device=self.log_temperature.device)
        return (self.log_temperature * self.temperature_grad).sum()


def _average_gradients(module: torch.nn.Module) -> None:
    """Average the trainable parameters' gradients over the ranks (what DDP's reducer would have done)."""
    import torch.distributed as dist

    size = dist.get_world_size()
    for parameter in module.parameters():
        if parameter.requires_grad and parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= size


class _RngState:
    """CPU and CUDA random states captured before a chunk's first forward, replayed for its second."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class LoggedParts:
    """Trainer mixin: values appended to `self._parts[name]` between logging steps are logged as their
    mean over the steps and over every process (loss parts as `loss/<part>`), so a part means the same
    under any number of processes. The Trainer logs on every rank, which makes the gather safe."""

    _parts: dict[str, list[float]]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            local = {name: (sum(values), len(values)) for name, values in sorted(self._parts.items())}
            ranks = gather(local)
            for name in local:
                total, count = (sum(r[name][i] for r in ranks) for i in (0, 1))
                logs[name] = total / max(1, count)
            self._parts.clear()
        super().log(logs, start_time)  # type: ignore[misc]


class TrainableCheckpoints:
    """Trainer mixin: checkpoints hold only what the stage trains (adapters, open modules, the
    temperature); resuming checks that the saved names are exactly the trainable ones."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        directory = Path(output_dir or self.args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        unwrapped = self.accelerator.unwrap_model(self.model)
        trainable = {
            n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad
        }
        save_file(trainable, directory / TRAINABLE_FILE)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        saved = load_file(Path(resume_from_checkpoint) / TRAINABLE_FILE)
        expected = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
        if set(saved) != expected:
            missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
            raise ValueError(
                f"checkpoint {resume_from_checkpoint} does not match this stage's trainable "
                f"parameters (missing {missing[:3]}, unexpected {extra[:3]})"
            )
        unwrapped.load_state_dict(saved, strict=False)


def refuse_unsupported_engines(trainer: Trainer) -> None:
    """Stop before training on an engine combination that would not train what the recipe asks.

    - FSDP needs an accelerator device: accelerate (1.15) turns an FSDP launch on a CPU-only machine
      into plain DDP without a word, so the run would not be sharded at all.
    - DeepSpeed ZeRO-3 partitions the parameters themselves, and a stage ends by merging LoRA into
      the full weights and saving them from one process, which needs them gathered first (not built).
    """
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(trainer.args.fsdp)
    if fsdp_asked and not trainer.is_fsdp_enabled:
        raise ConfigError(
            "FSDP was asked for, but accelerate runs FSDP only on GPUs (or other accelerators); on this "
            "machine it would silently train with DDP. Launch with `accelerate launch --multi_gpu` (DDP) "
            "or a DeepSpeed ZeRO-1/2 config instead."
        )
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
        raise ConfigError(
            "DeepSpeed ZeRO-3 is not supported: a stage saves its merged weights from one process, "
            "which ZeRO-3's partitioned parameters do not allow; use ZeRO-1 or ZeRO-2."
        )


class StageTrainer(LoggedParts, TrainableCheckpoints, Trainer):
    """What every umarvel `Trainer` shares: logged loss parts, trainable-only checkpoints, the engines
    it refuses, the epoch passed to the dataset, and `compute_loss` in terms of `batch_loss`."""

    def __init__(self, **kwargs: Any) -> None:
        self._parts: dict[str, list[float]] = defaultdict(list)
        super().__init__(**kwargs)
        refuse_unsupported_engines(self)
        self.add_callback(_EpochCallback(self.train_dataset))

    def batch_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """The batch's loss and its outputs (what `prediction_step` may read)."""
        raise NotImplementedError

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        loss, outputs = self.batch_loss(model, inputs)
        return (loss, outputs) if return_outputs else loss


class EmbedderTrainer(StageTrainer):
    """`Trainer` for an `Embedder`: InfoNCE parts, their logging, the temperature's learning rate,
    trainable-only checkpoints, and GradCache when `gradcache_chunk_size` > 0."""

    def __init__(self, *, model: Embedder, train_config: TrainConfig, **kwargs: Any) -> None:
        self.train_config = train_config
        super().__init__(model=model, **kwargs)
        # Set by the training loop; a default lets `training_step` run on its own (tests, debugging).
        self.current_gradient_accumulation_steps = 1

    # ---- loss ------------------------------------------------------------------------------------

    def _embedder(self, model: torch.nn.Module) -> Embedder:
        return self.accelerator.unwrap_model(model)

    def _loss(
        self, model: torch.nn.Module, embedded: dict[str, torch.Tensor], inputs: dict[str, Any]
    ) -> torch.Tensor:
        config = self.train_config
        if config.loss == "distill":
            return self._distill_loss(model, embedded, inputs)
        scale = self._loss_scale()
        gather = scale > 1
        # Every rank computes the loss of the global batch; DDP averages gradients over ranks, so the
        # embeddings' path is scaled by the world size, and the temperature (shared, identical on every
        # rank) has that scale undone.
        temperature = _scale_gradient(self._embedder(model).temperature, 1.0 / scale)
        queries, negatives = embedded["queries"], embedded.get("negatives")
        if negatives is not None:
            negatives = negatives.view(queries.shape[0], config.hard_negatives, -1)  # (N, k, D)
        masking = config.mask_false_negatives
        options: dict[str, Any] = {
            "positive_ids": inputs["positive_ids"] if masking else None,
            "negative_ids": inputs.get("negative_ids") if masking else None,
            "relevant_ids": inputs.get("relevant_ids") if masking else None,
            "symmetric": config.symmetric,
            "gather": gather,
        }
        if config.matryoshka_dims:
            parts, each = matryoshka_info_nce(
                queries, embedded["positives"], temperature, config.matryoshka_dims, negatives, **options
            )
            for name, value in each.items():
                self._parts[f"matryoshka/{name}"].append(float(value.detach()))
        else:
            parts = info_nce(queries, embedded["positives"], temperature, negatives=negatives, **options)
        return self._record(parts) * scale

    def _record(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, value in parts.items():
            self._parts[f"loss/{name}"].append(float(value.detach()))
        return sum(parts.values())  # type: ignore[return-value]

    def _distill_loss(
        self, model: torch.nn.Module, embedded: dict[str, torch.Tensor], inputs: dict[str, Any]
    ) -> torch.Tensor:
        """Stage C: KL(teacher || student) over each query's shortlist, on the local batch (method 7.2),
        plus an optional weighted InfoNCE with the labelled positive against the shortlist."""
        config = self.train_config
        temperature = self._embedder(model).temperature
        queries = embedded["queries"]
        shortlist = embedded["shortlist"].view(queries.shape[0], -1, queries.shape[1])  # (N, K, D)
        parts = {
            "distill_kl": distillation_kl(
                queries, shortlist, inputs["teacher"], temperature, inputs["shortlist_valid"]
            )
        }
        if config.distill_infonce_weight > 0:
            nce = info_nce(
                queries,
                embedded["positives"],
                temperature,
                negatives=shortlist,
                positive_ids=inputs["positive_ids"],
                negative_ids=inputs["shortlist_ids"],
                relevant_ids=inputs.get("relevant_ids"),
            )["query_to_candidate"]
            parts["infonce"] = config.distill_infonce_weight * nce
        return self._record(parts)

    @staticmethod
    def _embed(model: torch.nn.Module, chunks: list[dict[str, Any]] | None) -> torch.Tensor | None:
        if chunks is None:
            return None
        return torch.cat([model(_to_batch(chunk)) for chunk in chunks])  # (n, D)

    def batch_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        embedded = {side: self._embed(model, inputs[side]) for side in SIDES if side in inputs}
        return self._loss(model, embedded, inputs), None  # type: ignore[arg-type]

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        if not self.train_config.gradcache_chunk_size:
            # The logged loss is the global batch's, whatever the world size.
            return super().training_step(model, inputs, num_items_in_batch) / self._loss_scale()
        return self._gradcache_step(model, inputs)

    def _gradcache_step(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """GradCache (Gao et al., 2021): embed every chunk without a graph and take the loss's gradients
        with respect to those cached embeddings (and the temperature); then re-embed chunk by chunk with
        a graph and back-propagate the cached gradients, with each chunk's random state replayed so its
        dropout masks match. Memory stays that of one chunk; the gradients are the plain path's.

        How the second pass reaches the engine depends on it (`_backward_per_chunk`,
        `_backward_once`)."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        sides = [name for name in SIDES if name in inputs]
        states: dict[str, list[_RngState]] = {}
        cached: dict[str, list[torch.Tensor]] = {}
        # The graph-free pass needs no gradient synchronisation: under DDP it runs on the bare module, so
        # the DDP reducer sees only the pass that backpropagates.
        plain = self.accelerator.unwrap_model(model) if self._ddp(model) else model
        with torch.no_grad(), self.compute_loss_context_manager():
            for side in sides:
                states[side], cached[side] = [], []
                for chunk in inputs[side]:
                    states[side].append(_RngState())
                    cached[side].append(plain(_to_batch(chunk)))
        leaves = {side: [c.detach().requires_grad_() for c in cached[side]] for side in sides}
        with self.compute_loss_context_manager():
            embedded = {side: torch.cat(leaves[side]) for side in sides}
            loss = self._loss(model, embedded, inputs) / self.current_gradient_accumulation_steps
        order = [(side, i) for side in sides for i in range(len(inputs[side]))]
        log_temperature = self._embedder(model).log_temperature
        targets = [leaves[side][i] for side, i in order]
        if log_temperature.requires_grad:
            targets.append(log_temperature)
        grads = list(torch.autograd.grad(loss, targets, allow_unused=True))
        cache = _GradCache(
            [(states[side][i], inputs[side][i]) for side, i in order],
            grads[: len(order)],
            log_temperature,
            grads[-1] if log_temperature.requires_grad else None,
        )
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            if self._engine_steps_in_backward():
                self._backward_once(model, cache)
            elif self._ddp(model):
                # DDP's reducer expects one forward-backward per step; GradCache makes many, so they run
                # on the bare module with the reducer idle, and the gradients are averaged here.
                with model.no_sync():
                    self._backward_per_chunk(plain, cache)
                _average_gradients(plain)
            else:
                self._backward_per_chunk(model, cache)
        return loss.detach() / self._loss_scale()

    def _backward_per_chunk(self, model: torch.nn.Module, cache: _GradCache) -> None:
        """One backward per chunk, gradients kept local (`no_sync`) until the last, as in gradient
        accumulation (FSDP, one process; DDP on the bare module); the temperature's term rides with the
        last chunk. No forward is repeated."""
        chunks, grads = cache.chunks, cache.grads
        for position, ((state, chunk), grad) in enumerate(zip(chunks, grads, strict=True)):
            last = position == len(chunks) - 1
            with self.accelerator.no_sync(model) if not last else contextlib.nullcontext():
                state.restore()
                with self.compute_loss_context_manager():
                    embedding = model(_to_batch(chunk))
                surrogate = (embedding * grad).sum() if grad is not None else embedding.sum() * 0.0
                if last:
                    surrogate = surrogate + cache.temperature_term()
                self.accelerator.backward(surrogate)

    def _backward_once(self, model: torch.nn.Module, cache: _GradCache) -> None:
        """DeepSpeed: its engine steps the optimiser inside every `backward`, so it gets exactly one: the
        sum over chunks of <embedding, cached gradient> (plus the temperature's term), each chunk
        re-embedded under non-reentrant activation checkpointing, so backward recomputes one chunk's
        activations at a time. This costs one more forward per chunk than `_backward_per_chunk`."""
        from torch.utils.checkpoint import checkpoint

        surrogate = cache.temperature_term()
        for (state, chunk), grad in zip(cache.chunks, cache.grads, strict=True):
            if grad is None:
                continue
            state.restore()
            with self.compute_loss_context_manager():
                embedding = checkpoint(model, _to_batch(chunk), use_reentrant=False)
            surrogate = surrogate + (embedding * grad).sum()
        self.accelerator.backward(surrogate)

    @staticmethod
    def _ddp(model: torch.nn.Module) -> bool:
        return isinstance(model, torch.nn.parallel.DistributedDataParallel)

    def _engine_steps_in_backward(self) -> bool:
        """Whether `accelerator.backward` also steps the optimiser (DeepSpeed's engine does)."""
        return bool(self.is_deepspeed_enabled)

    def _loss_scale(self) -> float:
        """The factor `_loss` applies for the cross-device gather (see there): undone for logging."""
        config = self.train_config
        gather = config.loss != "distill" and config.gather_across_devices and world_size() > 1
        return float(world_size()) if gather else 1.0

    # ---- optimiser, logging, checkpoints --------------------------------------------------------------

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            embedder = self._embedder(self.model if model is None else model)
            temperature = embedder.log_temperature
            others = [p for p in embedder.parameters() if p.requires_grad and p is not temperature]
            groups: list[dict[str, Any]] = [{"params": others, "weight_decay": self.args.weight_decay}]
            if temperature.requires_grad:
                lr = self.train_config.temperature_lr or self.args.learning_rate
                groups.append({"params": [temperature], "weight_decay": 0.0, "lr": lr})
            self.optimizer = torch.optim.AdamW(
                groups,
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["temperature"] = round(float(self._embedder(self.model).temperature.detach()), 5)
        super().log(logs, start_time)


def training_arguments(config: TrainConfig, output_dir: Path, seed: int) -> TrainingArguments:
    """`TrainingArguments` for one stage from our typed config."""
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.per_device_batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type="cosine",
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        max_grad_norm=config.max_grad_norm,
        bf16=native_bf16() if config.bf16 == "auto" else config.bf16,
        # bf16 on a CPU (AMX) needs the Trainer told it is a CPU run.
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=config.dataloader_workers,
        remove_unused_columns=False,
        report_to=[],
        deepspeed=config.deepspeed,
        # A plain step embeds several sides (queries, positives, negatives) through the model before one
        # backward; DDP accepts a parameter made ready more than once per step only with a static graph.
        # GradCache steps bypass DDP's reducer (see `_gradcache_step`).
        ddp_static_graph=not config.gradcache_chunk_size,
        disable_tqdm=False,
    )
