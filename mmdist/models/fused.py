"""Stage 2: the fused vision-language model (frozen vision encoder -> stage-1 module -> projector -> frozen LLM).

The LLM is fed ``inputs_embeds``: the embeddings of ``input_ids`` (through
``llm.get_input_embeddings()``) with the projected image tokens written at
exactly the positions holding ``image_token_id``. Images fill those positions in
order of appearance, row by row, so ``pixel_values[i]`` belongs to the i-th image
placeholder run of the batch. Gradients flow through the frozen LLM into the
projector (and the stage-1 module when it trains).

The placeholder id is usually added to the tokenizer after the LLM was trained,
so it may lie beyond the embedding matrix; a frozen LLM is not resized: the
lookup uses an existing id there, since those rows are overwritten anyway.

Packed rows (``sequence_ids`` in the batch) get per-sample ``position_ids`` and
attention kept inside each sample: with sdpa, mmdist's packed attention (spans, or
a FlexAttention block mask: ``model.llm.packed_attention``); otherwise a 4-D
block-diagonal causal mask (additive float, accepted as-is by eager and sdpa attention).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmdist.models.connectors import Projector, pool_tokens
from mmdist.models.contract import BatchCounts, count_samples, leading_size
from mmdist.models.flops import FlopCount, compute_dtype, module_flops, part_flops
from mmdist.models.freeze import FrozenAwareModule, Part
from mmdist.models.llm import stop_token_ids
from mmdist.models.packed_attention import (
    document_block_mask,
    resolve_packed_kernel,
    spans_from_sequence_ids,
    use_packed_attention,
)
from mmdist.models.settings import ModelConfig


def block_causal_mask(sequence_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] sample index per token (-1 = padding) -> additive mask [B, 1, T, T] (0 allowed, dtype min blocked).

    A token sees earlier tokens of its own sample. Padding tokens see only
    themselves, so no attention row is empty (an empty row gives NaN in sdpa).
    """
    b, t = sequence_ids.shape
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=sequence_ids.device).tril()
    allowed = same & causal & (sequence_ids[:, None, :] >= 0)
    allowed |= torch.eye(t, dtype=torch.bool, device=sequence_ids.device)
    mask = torch.zeros(b, 1, t, t, dtype=dtype, device=sequence_ids.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def supervised_mask(batch: dict) -> torch.Tensor:
    """[B, T-1] bool: the positions whose next token is a label
    (answer tokens), never across a packed-sample boundary."""
    supervised = batch["labels"][:, 1:] != -100
    if batch.get("sequence_ids") is not None:
        seq = batch["sequence_ids"]
        supervised &= seq[:, 1:] == seq[:, :-1]
    return supervised


def head_at_supervised_only(llm: nn.Module) -> bool:
    """Whether :meth:`FusedVLM.token_losses` runs ``llm``'s output head at supervised positions only (a decoder and a
    plain head) rather than taking the full-logits path (no decoder to call, or logit soft-capping)."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else None
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    return decoder is not None and head is not None and not getattr(llm.config, "final_logit_softcapping", None)


def fused_flop_count(llm: nn.Module, projector: nn.Module, *, vision: FlopCount = FlopCount(),
                     vision_trains: bool = False, stage1: Optional[nn.Module] = None,
                     stage1_tokens: int = 0) -> FlopCount:
    """Stage 2's training FLOPs by where each part runs (mmdist.models.flops for the rules); also what the planner
    counts on meta-device modules.

    - ``vision``: the tower's count per image (mmdist.models.vision.tower_flop_count), nothing when it does not
      run (cached features); ``vision_trains``: a gradient comes up from it;
    - ``stage1`` per image at its ``stage1_tokens`` output tokens, unless it counts itself;
    - the projector per image token (the LLM positions the images fill);
    - the LLM per token, its output head per supervised token where :func:`head_at_supervised_only`, else per token.

    A gradient flows down to the lowest trainable part: the projector always trains, so the frozen LLM above it
    costs 4 per weight, the frozen tower and a frozen stage-1 module below it 2.
    """
    count = vision
    grad = vision_trains
    if stage1 is not None:
        count += module_flops(stage1, "per_image", stage1_tokens, input_grad=grad)
        grad = grad or any(p.requires_grad for p in stage1.parameters())
    count += part_flops(projector, "per_image_token", 1, input_grad=grad)
    grad = grad or any(p.requires_grad for p in projector.parameters())
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    if head is None or not head_at_supervised_only(llm):
        return count + part_flops(llm, "per_token", 1, input_grad=grad)
    dtype = compute_dtype(llm)
    return (count + part_flops(llm, "per_token", 1, input_grad=grad, skip=[head])
            + part_flops(head, "per_supervised_token", 1, input_grad=grad, dtype=dtype))


class FusedVLM(FrozenAwareModule):
    """Stage-2 model. ``forward(batch) -> {loss, metrics, num_tokens}``; ``generate(...)`` for inference."""

    def __init__(
        self,
        settings: ModelConfig,
        processors: Any,
        vision: nn.Module,
        llm: nn.Module,
        stage1: Optional[nn.Module] = None,
        *,
        uses_feature_cache: bool = False,
    ):
        """``uses_feature_cache``: batches carry cached vision
        features instead of pixels (the run reads a feature cache)."""
        super().__init__()
        self.uses_feature_cache = uses_feature_cache
        conn = settings.connector
        self.settings = settings
        self.processors = processors
        self.vision = vision
        self.stage1 = stage1
        embedding = llm.get_input_embeddings()
        llm_dim = int(embedding.embedding_dim)  # module attributes, not weight.shape (empty under ZeRO-3)
        in_dim = stage1.out_dim if stage1 is not None else vision.hidden_size
        self.projector = Projector(in_dim, llm_dim, conn.projector_layers)
        self.llm = llm
        self.num_image_tokens = stage1.num_tokens if stage1 is not None else (conn.image_tokens or vision.num_tokens)
        self.image_token_id = int(processors.image_token_id)
        rows = int(embedding.num_embeddings)
        pad = getattr(processors.tokenizer, "pad_token_id", None)
        fallback = pad if pad is not None and pad < rows else 0
        # The id used for the embedding lookup at placeholder positions (overwritten afterwards).
        self.lookup_id = self.image_token_id if self.image_token_id < rows else int(fallback)
        # Packed rows: SDPA per sample, or FlexAttention, instead
        # of a dense block-diagonal mask (see packed_attention.py).
        self.packed_attention = use_packed_attention(llm)
        self.packed_kernel = resolve_packed_kernel(settings.llm.packed_attention)
        if self.packed_kernel == "flex" and not self.packed_attention:
            raise ValueError("model.llm.packed_attention=flex: this LLM cannot switch to mmdist's packed attention "
                             "(it needs attn_implementation sdpa and transformers' AttentionInterface); use auto")
        self.apply_policy()
        if settings.llm.gradient_checkpointing:
            # Non-reentrant checkpointing: gradients reach inputs_embeds through frozen weights.
            if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2x
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def parts(self) -> list[Part]:
        m = self.settings
        return [
            Part("vision", trainable=not m.vision.freeze, dtype=m.vision.dtype),
            Part("stage1", trainable=m.connector.train_stage1_module, dtype="fp32"),
            Part("projector", trainable=True, dtype="fp32"),
            Part("llm", trainable=not m.llm.freeze, dtype=m.llm.dtype),
        ]

    def train(self, mode: bool = True):
        super().train(mode)
        # HF only recomputes activations in train mode, and LoRA dropout only acts in
        # train mode: then a frozen LLM follows the wrapper's mode, with its own
        # dropout layers kept off (the LoRA dropout stays on).
        llm = self.settings.llm
        if llm.freeze and (llm.gradient_checkpointing or llm.lora.enabled):
            self.llm.train(mode)
            for name, module in self.llm.named_modules():
                if isinstance(module, nn.Dropout) and "lora_dropout" not in name:
                    module.eval()
        return self

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {
            "projector": [p for p in self.projector.parameters() if p.requires_grad]
        }
        if self.stage1 is not None:
            groups["stage1"] = [p for p in self.stage1.parameters() if p.requires_grad]
        lora = [p for n, p in self.llm.named_parameters() if p.requires_grad and "lora_" in n]
        if lora:
            groups["lora"] = lora
        if not self.settings.llm.freeze:
            groups["llm"] = [p for n, p in self.llm.named_parameters() if p.requires_grad and "lora_" not in n]
        if not self.settings.vision.freeze:
            groups["vision"] = [p for p in self.vision.parameters() if p.requires_grad]
        return {k: v for k, v in groups.items() if v}

    # -- images -----------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen vision features [N, tokens, D] (what the feature cache stores)."""
        return self.vision(pixel_values)

    def image_embeddings(self, pixel_values: Optional[torch.Tensor] = None,
                         image_features: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Images -> [N, num_image_tokens, llm_dim] in the projector's dtype, or None without images."""
        if image_features is None:
            if pixel_values is None or pixel_values.shape[0] == 0:
                return None
            if self.settings.vision.freeze:
                with torch.no_grad():
                    image_features = self.vision(pixel_values)
            else:
                image_features = self.vision(pixel_values)
        elif image_features.shape[0] == 0:
            return None
        if self.stage1 is not None:
            tokens = self.stage1.image_tokens_of(image_features)
        else:
            tokens = pool_tokens(image_features, self.settings.connector.image_tokens)
        return self.projector(tokens)

    def embed(self, input_ids: torch.Tensor, image_embeds: Optional[torch.Tensor]) -> torch.Tensor:
        """inputs_embeds [B, T, H]: token embeddings with image tokens written at the placeholder positions."""
        embedding = self.llm.get_input_embeddings()
        is_image = input_ids == self.image_token_id
        embeds = embedding(input_ids.masked_fill(is_image, self.lookup_id))
        found = int(is_image.sum())
        images = 0 if image_embeds is None else image_embeds.shape[0]
        expected = images * self.num_image_tokens
        if found != expected:
            raise ValueError(
                f"the batch has {found} image placeholder tokens (id {self.image_token_id}) but {images} image(s) x "
                f"{self.num_image_tokens} tokens = {expected}; each image must expand to exactly num_image_tokens "
                f"placeholders and pixel_values/image_features must hold one entry per image, in order"
            )
        if images:
            if image_embeds.shape[1] != self.num_image_tokens:
                raise ValueError(
                    f"image embeddings have {image_embeds.shape[1]} tokens, expected {self.num_image_tokens}"
                )
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))
        return embeds

    # -- training ---------------------------------------------------------

    def _llm_inputs(self, batch: dict) -> dict:
        input_ids = batch["input_ids"]
        image_embeds = self.image_embeddings(batch.get("pixel_values"), batch.get("image_features"))
        dummy = self._dummy_image_embeddings(input_ids.device) if image_embeds is None else None
        embeds = self.embed(input_ids, image_embeds)
        if dummy is not None:
            # Tie the dummy to the graph with weight 0: backward then reaches every trainable
            # parameter (zero gradients, not missing ones) in the order an image batch takes.
            embeds = embeds + (0.0 * dummy.float().sum()).to(embeds.dtype)
        inputs: dict[str, Any] = {"inputs_embeds": embeds, "use_cache": False}
        path = self.attention_path(batch)
        if path == "flash_varlen":
            # FlashAttention takes no 4-D mask: transformers derives the packed sequences
            # from position_ids restarting at 0 when no attention_mask is given.
            # (Not exercised by the CPU tests.)
            if batch.get("position_ids") is None:
                raise ValueError("packed batches for flash_attention_2 need position_ids (restarting at 0 per sample)")
            inputs["attention_mask"] = None
        elif path == "flex":
            inputs["attention_mask"] = None  # built here once, reused by every layer and the checkpointed recompute
            inputs["mmdist_block_mask"] = document_block_mask(batch["sequence_ids"])
        elif path == "sdpa_per_sample":
            inputs["attention_mask"] = None
            inputs["mmdist_spans"] = spans_from_sequence_ids(batch["sequence_ids"])
        elif path == "block_mask":
            inputs["attention_mask"] = block_causal_mask(batch["sequence_ids"], embeds.dtype)
        elif path == "padding_mask":
            inputs["attention_mask"] = batch["attention_mask"]
        if batch.get("position_ids") is not None:
            inputs["position_ids"] = batch["position_ids"]
        return inputs

    def attention_path(self, batch: dict) -> str:
        """How the LLM attends over ``batch``'s rows (what :meth:`forward` runs, read by benchmarks/gpu_system.py):
        packed rows (``sequence_ids``) take ``flash_varlen`` (flash_attention_2, samples from ``position_ids``),
        ``flex`` or ``sdpa_per_sample`` (mmdist/models/packed_attention.py) or ``block_mask`` (a dense 4-D mask);
        other rows ``padding_mask``, or ``none`` without an attention mask."""
        if batch.get("sequence_ids") is not None:
            if self.settings.llm.attn_implementation == "flash_attention_2":
                return "flash_varlen"
            if self.packed_attention:
                return self.packed_kernel
            return "block_mask"
        return "padding_mask" if batch.get("attention_mask") is not None else "none"

    def _dummy_image_embeddings(self, device: torch.device) -> torch.Tensor:
        """Image embeddings of a zero image, for a batch without images.

        Under ZeRO-3 every rank must gather the same parameters in the same order: a rank
        whose micro-batch is text-only while its peer's has images would otherwise skip the
        (partitioned) vision tower, stage-1 module and projector, or reach them after the
        LLM, and the collectives would fall out of step (a crash or a hang). So the dummy
        takes the path real images take, before the LLM (cached features when the run reads
        a feature cache, pixels otherwise).
        """
        if self.uses_feature_cache:
            features = torch.zeros(1, self.vision.num_tokens, self.vision.hidden_size, device=device)
            return self.image_embeddings(image_features=features)
        size = self.vision.image_size
        pixels = torch.zeros(1, 3, size, size, device=device)  # RGB, as the image transform and the tower probe give
        return self.image_embeddings(pixel_values=pixels)

    def token_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-target-token loss [B, T-1] with 0 where not supervised, supervised mask [B, T-1]).

        The vocabulary projection and the fp32 log-softmax run only at supervised
        positions (answer tokens), not on prompt, image and padding positions: the LM
        head is a large share of a small LLM's matmuls (21% of SmolLM2-135M's), and
        most positions carry no label. Models whose head does more than a Linear
        (logit soft-capping) take the plain full-logits path.
        """
        labels = batch["labels"][:, 1:]
        supervised = supervised_mask(batch)
        if not head_at_supervised_only(self.llm):
            logits = self.llm(**self._llm_inputs(batch)).logits[:, :-1].float()
            losses = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.masked_fill(~supervised, 0).reshape(-1), reduction="none"
            ).view_as(labels)
            return losses * supervised, supervised
        hidden = self.llm.get_decoder()(**self._llm_inputs(batch)).last_hidden_state
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][supervised]).float()
        flat = F.cross_entropy(logits, labels[supervised], reduction="none")
        losses = torch.zeros(labels.shape, dtype=flat.dtype, device=flat.device).masked_scatter(supervised, flat)
        return losses, supervised

    @staticmethod
    def loss_terms(batch: dict) -> int:
        """How many token losses ``forward`` averages over for ``batch``, known before running it.

        The trainer sums this over every micro-batch of an optimizer step on every rank,
        so that the step's gradient is the mean over all its answer tokens however the
        global batch is cut into micro-batches and ranks (mmdist.training.step.train_step).
        """
        return int(supervised_mask(batch).sum())

    def batch_counts(self, batch: dict) -> BatchCounts:
        """Samples (a packed row counts its own), tokens under the attention mask, answer tokens (the loss terms),
        images and the LLM positions they fill, and the positions the LLM runs on: rows x row length (padding
        included; mmdist.models.contract)."""
        images = leading_size(batch, "pixel_values", "image_features")
        terms = self.loss_terms(batch)
        return BatchCounts(samples=count_samples(batch, "input_ids"), tokens=int(batch["attention_mask"].sum()),
                           supervised_tokens=terms, images=images, image_tokens=images * self.num_image_tokens,
                           loss_terms=terms, positions=batch["input_ids"].numel())

    def flop_count(self, *, vision_runs: bool = True, text_runs: bool = True) -> FlopCount:
        """The training FLOPs of a step's parts where they run (:func:`fused_flop_count`; mmdist.models.contract).
        ``text_runs`` has no effect: stage 2 has no text encoder."""
        trains = any(p.requires_grad for p in self.vision.parameters())
        runs = (vision_runs and not self.uses_feature_cache) or trains
        return fused_flop_count(self.llm, self.projector, vision=self.vision.flop_count() if runs else FlopCount(),
                                vision_trains=trains, stage1=self.stage1,
                                stage1_tokens=getattr(self.stage1, "num_tokens", 0))

    def forward(self, batch: dict) -> dict:
        losses, supervised = self.token_losses(batch)
        num_tokens = supervised.sum()
        loss = losses.sum() / num_tokens.clamp(min=1)
        return {
            "loss": loss,
            "num_tokens": num_tokens,
            "metrics": {"lm": loss.detach(), "tokens": num_tokens.detach().float()},
        }

    @torch.no_grad()
    def sample_losses(self, batch: dict) -> list[float]:
        """Mean loss of every sample (packed samples separated by sequence_ids), row by row."""
        losses, supervised = self.token_losses(batch)
        seq = batch.get("sequence_ids")
        out = []
        for row in range(losses.shape[0]):
            ids = seq[row, 1:] if seq is not None else torch.zeros_like(losses[row], dtype=torch.long)
            for sample in torch.unique(ids[supervised[row]]).tolist():
                sel = supervised[row] & (ids == sample)
                out.append(float(losses[row][sel].sum() / sel.sum()))
        return out

    # -- inference --------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Optional[torch.Tensor] = None, image_features: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 32, **kwargs: Any) -> torch.Tensor:
        """Greedy (unless kwargs say otherwise) generation from inputs_embeds; returns only the new token ids.

        Batched prompts must be left-padded (attention_mask 0 on the left). The LLM's
        ``generate`` keeps a KV cache (``past_key_values``) from the prompt's
        ``inputs_embeds`` on, so each step feeds only the newest token.
        """
        embeds = self.embed(input_ids, self.image_embeddings(pixel_values, image_features))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tok = self.processors.tokenizer
        kwargs.setdefault("do_sample", False)
        # the KV cache: each new token attends to cached keys/values, not the whole prefix again
        kwargs.setdefault("use_cache", True)
        kwargs.setdefault("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        stops = stop_token_ids(tok)  # Qwen1: <|im_end|> ends a ChatML answer, <|endoftext|> a document
        if stops:
            kwargs.setdefault("eos_token_id", stops)
        if kwargs["do_sample"] is False:
            kwargs.setdefault("temperature", None)
            kwargs.setdefault("top_p", None)
            kwargs.setdefault("top_k", None)
        return self.llm.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **kwargs
        )

    # -- export -----------------------------------------------------------

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained weights by name: projector, stage-1 module, and with LoRA the merged LLM weights (W + BA)."""
        out = {f"projector.{k}": v.detach().cpu() for k, v in self.projector.state_dict().items()}
        if self.stage1 is not None:
            out.update({f"stage1.{k}": v.detach().cpu() for k, v in self.stage1.state_dict().items()})
        if self.settings.llm.lora.enabled:
            from mmdist.models.lora import lora_layers, merged_lora_weights

            gather = getattr(self, "gather", None)
            if gather is None:
                out.update(merged_lora_weights(self.llm))
            else:
                with gather([p for _, m in lora_layers(self.llm) for p in m.parameters()]):
                    out.update(merged_lora_weights(self.llm))
        return out

