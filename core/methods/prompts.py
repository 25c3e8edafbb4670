"""Prompt-family methods: learned tokens, key/value prefixes and gated prompts.

All five act on activations, so none merges into weights (``mergeable=False``):

* Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt
  Tuning"): n learned embeddings P in R^{n x d} are prepended to the input embeddings,
  X' = [P; E(x)], and the frozen model runs on the longer sequence. n d parameters.
* Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
  Generation"): every layer l attends over learned keys and values first,
  head = Attn(x W_q, [P_k^l; x W_k], [P_v^l; x W_v]); optionally reparameterised as
  P = MLP(P'), P' in R^{n x d}, MLP = Linear(d, h) - tanh - Linear(h, 2 L d_kv).
  Directly learned: 2 n L d_kv parameters (2 n d_kv per layer).
* Control Prefixes (Clive et al., 2022, "Control Prefixes for Parameter-Efficient Text
  Generation"): prefix tuning's shared task prefix plus, per example, the prefix C_a of
  its attribute value a: every layer attends over [P^l; C_a^l; x].
* VPT (Jia et al., 2022, "Visual Prompt Tuning") for timm ViTs: shallow inserts p prompts
  after the class token, [x_cls; P; E]; deep gives every block i its own prompts P_i,
  replacing the previous block's prompt outputs. p d (shallow) or depth p d (deep).
* LLaMA-Adapter (Zhang et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language
  Models with Zero-init Attention"): K learned prompts per adapted layer, attended with a
  separate softmax scaled by a zero-initialised gate g,
  attn = softmax(q K_w^T / sqrt(d_h)) V_w + g softmax(q K_p^T / sqrt(d_h)) V_p,
  with K_p, V_p the layer's own key/value projections of the prompts. K d + 1 parameters
  per layer (one gate per head: K d + H). LLaMA-Adapter V2 (Gao et al., 2023) options:
  bias and scale on every linear layer, y = s * (W x + b), and unlocked norms.

Only LLaMA-Adapter starts as the identity (its gate is zero; the V2 bias is zero and the
scale one). Prompt tuning, prefix tuning, Control Prefixes and VPT change the output from
the first step, as in their papers.

How they hook in. These methods change sequence lengths, attention masks, position ids,
the KV cache or the attention computation, which the plain ``pre``/``post`` protocol
(main input and output only) cannot reach. So an adapter here sits in its wrapper like any
other (saved, loaded, counted and activated by name) and acts inside the wrapped module's
own call through forward hooks that see every argument. Its ``pre`` marks the call it
runs in, so an inactive adapter leaves the call untouched. What to target:

* PromptTuning, PrefixTuning, ControlPrefix: the transformers backbone inside a task model
  (``"model"`` in LlamaForCausalLM, ``"bert"`` in BertForSequenceClassification), i.e. the
  module whose forward takes ``input_ids``/``inputs_embeds``, ``attention_mask``,
  ``position_ids`` and the cache. Prompt tuning prepends its prompts to the embeddings and
  drops the prompt positions from the outputs again, so a task head (and its labels) sees
  the original sequence: the loss is over real tokens only, as -100 labels over the
  prompt would give. Prefix tuning fills the cache with its keys/values before the first
  step. Both extend a 2-D attention mask with ones and shift given position ids by the
  number of virtual tokens, so cached generation (``model.generate(use_cache=True)``)
  equals a no-cache greedy loop token for token, padded batches included.
* VPT: the ViT's ``blocks`` (an nn.Sequential called as ``blocks(x)``).
* LLaMA-Adapter: decoder layers (``r"model\\.layers\\.\\d+"``); ``adapter_layers`` keeps
  the prompts in the top L layers as the paper (30 of LLaMA-7B's 32) and PEFT do.

Only one of prompt tuning / prefix tuning / Control Prefixes can run on one backbone at a
time; named adapters of these kinds switch with ``core.set_active``.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, check_choice, check_float, check_int
from ..errors import CheckpointError, ConfigError
from ..layers import Adapter, weight_dtype
from ..peft_format import PROMPT_LEARNING_KEY_PREFIX, PeftFormat, register_peft_format
from ..registry import register

# --- adapters that act inside their base module's call -----------------------------------


class CallAdapter(Adapter):
    """An adapter whose work happens in forward hooks on its base module (and, for
    LLaMA-Adapter, on modules inside it), because it needs the call's other arguments.

    ``pre`` arms the adapter for the call its wrapper is making; the base module's first
    hook takes the arm, so a call made while the adapter is inactive is never touched.
    """

    def __init__(self) -> None:
        super().__init__()
        self._armed = False
        self._handles: list[Any] = []

    def pre(self, x: Any) -> Any:
        self._armed = True
        return x

    def take_arm(self) -> bool:
        armed, self._armed = self._armed, False
        return armed

    def add_hook(self, module: nn.Module, hook, *, pre: bool = False, **options: Any) -> None:
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(hook, **options))

    def on_detach(self, base: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --- transformers backbones: arguments, masks, positions, outputs ------------------------

_OWNER = "_omnipeft_sequence_adapter"  # the adapter changing the sequence in this call
_SIGNATURES: dict[type, inspect.Signature] = {}


def forward_signature(module: nn.Module) -> inspect.Signature:
    """The signature of ``module.forward`` (through transformers' decorators), per class."""
    kind = type(module)
    if kind not in _SIGNATURES:
        _SIGNATURES[kind] = inspect.signature(module.forward)
    return _SIGNATURES[kind]


def forward_params(module: nn.Module) -> dict[str, inspect.Parameter]:
    return dict(forward_signature(module).parameters)


def call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """One call's arguments by name, positional ones included."""
    signature = forward_signature(module)
    params = signature.parameters
    bound = signature.bind_partial(*args, **kwargs).arguments
    named: dict[str, Any] = {}
    for key, value in bound.items():
        if params[key].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[key] = value
    return named


def cache_argument(module: nn.Module) -> str | None:
    """Which keyword carries the KV cache (transformers 5 renamed past_key_values)."""
    params = forward_params(module)
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def pop_cache(named: dict[str, Any]) -> Any:
    cache = named.pop("cache", None)
    legacy = named.pop("past_key_values", None)
    return cache if cache is not None else legacy


def batch_size(named: dict[str, Any]) -> int:
    source = named.get("input_ids")
    source = named.get("inputs_embeds") if source is None else source
    if source is None:
        raise ValueError("the backbone was called without input_ids or inputs_embeds.")
    return source.shape[0]


def extend_mask(mask: Any, count: int) -> Any:
    """A 2-D padding mask over real tokens, with ``count`` attended positions in front."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(
            "prompt and prefix adapters extend 2-D attention masks (batch, tokens) only; "
            "pass the padding mask, not a prepared 4-D mask."
        )
    ones = torch.ones(mask.shape[0], count, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


def shift_positions(positions: Any, count: int) -> Any:
    return None if positions is None else positions + count


def drop_leading(output: Any, count: int) -> Any:
    """Remove the first ``count`` sequence positions from a backbone's outputs."""
    if output is None:
        return None
    if isinstance(output, tuple):
        return (output[0][:, count:], *output[1:])
    output.last_hidden_state = output.last_hidden_state[:, count:]
    if getattr(output, "hidden_states", None) is not None:
        output.hidden_states = tuple(h[:, count:] for h in output.hidden_states)
    if getattr(output, "attentions", None) is not None:  # queries only; keys stay visible
        output.attentions = tuple(a[:, :, count:] for a in output.attentions)
    return output


def text_config(module: nn.Module):
    config = module.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_geometry(module: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a transformers backbone."""
    config = text_config(module)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def backbone_problem(module: nn.Module, *, needs_cache: bool) -> str | None:
    """Why ``module`` is not a transformers backbone these methods can wrap, or None."""
    if not callable(getattr(module, "get_input_embeddings", None)) or not hasattr(module, "config"):
        return (
            "prompt and prefix methods wrap a transformers backbone with get_input_embeddings(): "
            "target e.g. 'model' in LlamaForCausalLM or 'bert' in BertForSequenceClassification"
        )
    if getattr(module.config, "is_encoder_decoder", False):
        return "encoder-decoder backbones are not supported; target a decoder- or encoder-only one"
    params = forward_params(module)
    if not {"inputs_embeds", "attention_mask"} <= set(params):
        return "its forward takes no inputs_embeds / attention_mask to extend"
    if needs_cache and cache_argument(module) is None:
        return "its forward takes no KV cache (cache / past_key_values) to hold the prefix"
    return None


class BackboneAdapter(CallAdapter):
    """Shared call handling of prompt tuning, prefix tuning and Control Prefixes.

    Subclasses implement ``prepare(base, named, cache, first)``: change the call's
    arguments, where ``first`` says the cache does not hold this adapter's tokens yet (no
    cache, or an empty one: a plain forward or generation's first step).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.cache_arg = cache_argument(backbone)
        self._drop = 0  # positions to drop from this call's outputs

    def on_attach(self, base: nn.Module) -> None:
        self.add_hook(base, self._before_call, pre=True, with_kwargs=True)
        self.add_hook(base, self._after_call, with_kwargs=True, always_call=True)

    def _before_call(self, base: nn.Module, args: tuple, kwargs: dict):
        self._drop = 0
        if not self.take_arm():
            return None
        owner = base.__dict__.get(_OWNER)
        if owner is not None and owner is not self:
            raise RuntimeError(
                f"{type(owner).__name__} and {type(self).__name__} are both active on this "
                "backbone; only one prompt / prefix adapter can run at a time. Use "
                "core.set_active(model, [name]) to pick one."
            )
        base.__dict__[_OWNER] = self
        named = call_arguments(base, args, kwargs)
        cache = pop_cache(named)
        first = cache is None or cache.get_seq_length() == 0
        cache = self.prepare(base, named, cache, first)
        if cache is not None:
            named[self.cache_arg] = cache
        return (), named

    def _after_call(self, base: nn.Module, args: tuple, kwargs: dict, output: Any):
        if base.__dict__.get(_OWNER) is self:
            del base.__dict__[_OWNER]
        count, self._drop = self._drop, 0
        return drop_leading(output, count) if count else None

    def prepare(self, base: nn.Module, named: dict, cache: Any, first: bool) -> Any:
        raise NotImplementedError


# --- prompt tuning ---------------------------------------------------------------------

PROMPT_INITS = ("vocab", "uniform", "normal", "tokens", "text")


@register("prompt_tuning", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class PromptTuning(AdapterConfig):
    """Prompt tuning (Lester et al., 2021): X' = [P; E(x)], P in R^{n x d} learned.

    Not the identity at initialisation: the prompts change the output from step 0.
    Target the transformers backbone (``"model"`` for LLaMA, ``"bert"`` for BERT); see the
    module docstring for masks, positions, labels and generation.

    Args:
        num_virtual_tokens: prompt length n (the paper's default is 100; its ablation finds
            about 20 already near the best for large models).
        init: "vocab" (embeddings of tokens sampled from the vocabulary, the paper's
            sampled-vocabulary init; the paper draws from the 5,000 most frequent tokens,
            but a vocabulary's frequency order is unknown here, so every id is drawn
            uniformly, as PEFT's SAMPLE_VOCAB does), "uniform" (U[-0.5, 0.5],
            the paper's random init), "normal" (N(0, 1), PEFT's RANDOM), "tokens" (the
            embeddings of ``init_token_ids``) or "text" (of ``init_text`` tokenised by
            ``tokenizer``). The paper finds concept/class-label inits beat random ones;
            "tokens"/"text" give that. Too few ids are repeated cyclically, too many cut.
        init_token_ids: token ids for init="tokens" (no tokenizer needed).
        init_text: text for init="text", tokenised without special tokens.
        tokenizer: name or local path for transformers.AutoTokenizer (init="text").
    """

    num_virtual_tokens: int = 100
    init: str = "vocab"
    init_token_ids: tuple[int, ...] | None = None
    init_text: str | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "num_virtual_tokens")
        check_choice(self, "init", PROMPT_INITS)
        self._check_init_sources()

    def _check_init_sources(self) -> None:
        name = type(self).__name__
        if self.init_token_ids is not None:
            ids = self.init_token_ids
            if isinstance(ids, list | tuple) and ids and all(_is_index(i) for i in ids):
                object.__setattr__(self, "init_token_ids", tuple(ids))
            else:
                raise ConfigError(
                    f"{name}.init_token_ids must be a non-empty list of token ids >= 0, got "
                    f"{ids!r}; e.g. init_token_ids=[101, 2023]."
                )
        needs = {"tokens": ("init_token_ids",), "text": ("init_text", "tokenizer")}
        for field_name in ("init_token_ids", "init_text", "tokenizer"):
            wanted = field_name in needs.get(self.init, ())
            given = getattr(self, field_name) is not None
            if wanted and not given:
                raise ConfigError(
                    f"{name}(init={self.init!r}) needs {field_name}; set it, or choose "
                    "init='vocab' (needs nothing)."
                )
            if given and not wanted:
                raise ConfigError(
                    f"{name}.{field_name} is only read when init="
                    f"{'tokens' if field_name == 'init_token_ids' else 'text'!r}, but "
                    f"init={self.init!r}; set that init or drop {field_name}."
                )
        if self.init == "text" and not (isinstance(self.init_text, str) and self.init_text):
            raise ConfigError(f"{name}.init_text must be a non-empty string.")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return backbone_problem(module, needs_cache=False)

    def build(self, module: nn.Module, path: str) -> PromptTuningAdapter:
        return PromptTuningAdapter(module, self)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def prompt_token_ids(cfg: PromptTuning, vocab_size: int) -> torch.Tensor | None:
    """The vocabulary ids whose embeddings start the prompt (None: a random init)."""
    if cfg.init == "vocab":
        return torch.randint(vocab_size, (cfg.num_virtual_tokens,))
    if cfg.init == "tokens":
        ids = list(cfg.init_token_ids)
    elif cfg.init == "text":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"PromptTuning.init_text {cfg.init_text!r} tokenises to nothing.")
    else:
        return None
    if max(ids) >= vocab_size:
        raise ConfigError(
            f"PromptTuning init token id {max(ids)} is outside the vocabulary (size "
            f"{vocab_size}); use ids below {vocab_size}."
        )
    return torch.tensor(list(itertools.islice(itertools.cycle(ids), cfg.num_virtual_tokens)))


def initial_prompt(cfg: PromptTuning, embedding: nn.Module) -> torch.Tensor:
    weight = embedding.weight
    shape = (cfg.num_virtual_tokens, weight.shape[1])
    opts = {"device": weight.device, "dtype": weight_dtype(embedding)}
    ids = prompt_token_ids(cfg, weight.shape[0])
    if ids is not None:
        return weight.detach()[ids.to(weight.device)].to(opts["dtype"]).clone()
    prompt = torch.empty(shape, **opts)
    if cfg.init == "uniform":
        return prompt.uniform_(-0.5, 0.5)
    return prompt.normal_()


class PromptTuningAdapter(BackboneAdapter):
    """Prepends ``prompt`` (n, d) to the backbone's input embeddings."""

    def __init__(self, backbone: nn.Module, cfg: PromptTuning) -> None:
        super().__init__(backbone)
        self.num_virtual_tokens = cfg.num_virtual_tokens
        self.prompt = nn.Parameter(initial_prompt(cfg, backbone.get_input_embeddings()))

    def prepare(self, base: nn.Module, named: dict, cache: Any, first: bool) -> Any:
        n = self.num_virtual_tokens
        named["attention_mask"] = extend_mask(named.get("attention_mask"), n)
        positions = named.get("position_ids")
        if not first:  # the cache already holds the prompt: only the offsets change
            named["position_ids"] = shift_positions(positions, n)
            return cache
        embeds = named.get("inputs_embeds")
        if embeds is None:
            embeds = base.get_input_embeddings()(named["input_ids"])
        batch = embeds.shape[0]
        prompts = self.prompt.to(embeds.dtype).expand(batch, -1, -1)
        named["input_ids"] = None
        named["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        if positions is not None:
            own = torch.arange(n, device=positions.device, dtype=positions.dtype)
            own = own.expand(*positions.shape[:-1], n)
            named["position_ids"] = torch.cat([own, positions + n], dim=-1)
        if named.get("token_type_ids") is not None:
            types = named["token_type_ids"]
            named["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], 1)
        self._drop = n
        return cache


# --- prefix tuning and Control Prefixes --------------------------------------------------


@register("prefix_tuning", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class PrefixTuning(AdapterConfig):
    """Prefix tuning (Li & Liang, 2021): learned keys/values in front of every layer's.

    Not the identity at initialisation. Target the transformers backbone (``"model"``,
    ``"bert"``); the prefix goes into the backbone's KV cache before the first step, so it
    works with transformers' cached generation.

    Args:
        num_virtual_tokens: prefix length n (the paper: 10 for table-to-text, 200 for
            summarisation).
        projection: generate the prefix as MLP(P') (the paper's reparameterisation, which
            it found more stable; PEFT's ``prefix_projection``) instead of learning the
            keys/values directly. After training only MLP(P') matters; an exported or
            imported adapter holds that table directly.
        encoder_hidden_size: the MLP's hidden width h (512 in the authors' code).
    """

    num_virtual_tokens: int = 10
    projection: bool = True
    encoder_hidden_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "num_virtual_tokens")
        check_int(self, "encoder_hidden_size")
        if not isinstance(self.projection, bool):
            raise ConfigError(
                f"{type(self).__name__}.projection must be True or False, got {self.projection!r}."
            )

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return backbone_problem(module, needs_cache=True)

    def build(self, module: nn.Module, path: str) -> PrefixTuningAdapter:
        return PrefixTuningAdapter(module, self)


def prefix_mlp(dim: int, hidden: int, width: int, **opts: Any) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden, **opts), nn.Tanh(), nn.Linear(hidden, width, **opts)
    )


class PrefixTuningAdapter(BackboneAdapter):
    """Holds the prefix as ``prefix`` (n, layers, 2, d_kv) or, with the projection,
    ``prefix_embedding`` (n, d) and ``mlp`` (d -> h -> layers * 2 * d_kv)."""

    def __init__(self, backbone: nn.Module, cfg: PrefixTuning) -> None:
        super().__init__(backbone)
        self.num_layers, self.kv_heads, self.head_dim = kv_geometry(backbone)
        self.num_virtual_tokens = cfg.num_virtual_tokens
        self.projection = cfg.projection
        embedding = backbone.get_input_embeddings()
        self.dim = embedding.weight.shape[1]
        opts = {"device": embedding.weight.device, "dtype": weight_dtype(embedding)}
        self.param_opts = opts
        if cfg.projection:
            self.prefix_embedding = nn.Parameter(
                torch.randn(self.rows(cfg.num_virtual_tokens), **opts)
            )
            self.mlp = prefix_mlp(self.dim, cfg.encoder_hidden_size, self.width, **opts)
        else:
            self.prefix = nn.Parameter(
                torch.randn(self.table_shape(cfg.num_virtual_tokens), **opts)
            )

    @property
    def width(self) -> int:
        return self.num_layers * 2 * self.kv_heads * self.head_dim

    def table_shape(self, *lead: int) -> tuple[int, ...]:
        return (*lead, self.num_layers, 2, self.kv_heads * self.head_dim)

    def rows(self, *lead: int) -> tuple[int, ...]:
        """Shape of the learned rows before the table: P' rows (projection) or the table."""
        return (*lead, self.dim) if self.projection else self.table_shape(*lead)

    @property
    def prefix_length(self) -> int:
        return self.num_virtual_tokens

    def to_table(self, rows: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, ...) learned rows -> (batch, tokens, layers, 2, d_kv)."""
        if self.projection:
            rows = self.mlp(rows)
        return rows.reshape(*rows.shape[:2], *self.table_shape())

    def call_inputs(self, named: dict) -> Any:
        """Take this method's own per-call arguments out of the call (none here)."""
        return None

    def learned_rows(self, batch: int, inputs: Any) -> torch.Tensor:
        own = self.prefix_embedding if self.projection else self.prefix
        return own.unsqueeze(0)

    def key_value_table(self, batch: int = 1, inputs: Any = None) -> torch.Tensor:
        """The prefix keys/values of every layer: (batch or 1, tokens, layers, 2, d_kv)."""
        return self.to_table(self.learned_rows(batch, inputs))

    def prepare(self, base: nn.Module, named: dict, cache: Any, first: bool) -> Any:
        count, inputs = self.prefix_length, self.call_inputs(named)
        named["attention_mask"] = extend_mask(named.get("attention_mask"), count)
        named["position_ids"] = shift_positions(named.get("position_ids"), count)
        if not first:  # the cache holds the prefix already
            return cache
        batch = batch_size(named)
        table = self.key_value_table(batch, inputs)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=base.config)
        dtype = base.get_input_embeddings().weight.dtype
        table = table.to(dtype).expand(batch, *table.shape[1:])
        for layer in range(self.num_layers):
            keys, values = (self.heads(table[:, :, layer, i]) for i in (0, 1))
            cache.update(keys, values, layer)
        return cache

    def heads(self, rows: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, d_kv) -> (batch, kv heads, tokens, head size), the cache layout."""
        return rows.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)


@register("control_prefix", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class ControlPrefix(PrefixTuning):
    """Control Prefixes (Clive et al., 2022): prefix tuning's shared task prefix plus, per
    example, one learned prefix per attribute value: every layer attends [P; C_a1; C_a2; x].

    Not the identity at initialisation. Attribute ids are given per example, (batch,) for
    one attribute or (batch, attributes), either as the ``control_ids=`` keyword of the
    model's forward or, e.g. for ``generate``, with ``with control(model, ids): ...``.
    With ``projection`` the task and control prefixes go through one shared MLP.

    Args:
        attribute_sizes: the number of values of each attribute, e.g. (3, 2) for a
            3-valued and a 2-valued attribute.
        control_tokens: the length of each attribute value's prefix.
        (and PrefixTuning's fields for the shared task prefix)
    """

    attribute_sizes: tuple[int, ...] = (2,)
    control_tokens: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "control_tokens")
        sizes = self.attribute_sizes
        if not (
            isinstance(sizes, list | tuple) and sizes and all(_is_index(s) and s for s in sizes)
        ):
            raise ConfigError(
                f"ControlPrefix.attribute_sizes must list each attribute's number of values "
                f"(ints >= 1), got {sizes!r}; e.g. attribute_sizes=[3, 2]."
            )
        object.__setattr__(self, "attribute_sizes", tuple(sizes))

    def build(self, module: nn.Module, path: str) -> ControlPrefixAdapter:
        return ControlPrefixAdapter(module, self)


class ControlPrefixAdapter(PrefixTuningAdapter):
    """Adds ``control`` rows (values of all attributes, control tokens, ...) to the prefix."""

    def __init__(self, backbone: nn.Module, cfg: ControlPrefix) -> None:
        super().__init__(backbone, cfg)
        self.attribute_sizes = cfg.attribute_sizes
        self.control_tokens = cfg.control_tokens
        offsets = [0, *itertools.accumulate(cfg.attribute_sizes)][:-1]
        # Where each attribute's values start in `control`: derived from the config.
        self.register_buffer("offsets", torch.tensor(offsets), persistent=False)
        shape = self.rows(sum(cfg.attribute_sizes), cfg.control_tokens)
        self.control = nn.Parameter(torch.randn(shape, **self.param_opts))
        self._context_ids: torch.Tensor | None = None

    @property
    def prefix_length(self) -> int:
        return self.num_virtual_tokens + len(self.attribute_sizes) * self.control_tokens

    def call_inputs(self, named: dict) -> Any:
        return named.pop("control_ids", None)

    def learned_rows(self, batch: int, inputs: Any) -> torch.Tensor:
        ids = self.attribute_ids(batch, inputs)
        shared = super().learned_rows(batch, inputs).expand(batch, *self.rows(-1))
        chosen = self.control[ids + self.offsets.to(ids.device)]  # (batch, attrs, tokens, ...)
        return torch.cat([shared, chosen.flatten(1, 2)], dim=1)

    def attribute_ids(self, batch: int, given: Any) -> torch.Tensor:
        ids = given if given is not None else self._context_ids
        if ids is None:
            raise ValueError(
                "a ControlPrefix adapter needs attribute ids for this call: pass "
                "control_ids=... to the model, or use `with control(model, ids):`."
            )
        ids = torch.as_tensor(ids, device=self.control.device).long()
        ids = ids.reshape(ids.shape[0], -1)
        if ids.shape[0] != batch and ids.shape[0] and batch % ids.shape[0] == 0:
            ids = ids.repeat_interleave(batch // ids.shape[0], dim=0)  # generate's expansion
        sizes = torch.tensor(self.attribute_sizes, device=ids.device)
        if ids.shape != (batch, len(sizes)) or bool(((ids < 0) | (ids >= sizes)).any()):
            raise ValueError(
                f"control ids must have shape ({batch},) or ({batch}, {len(sizes)}) with "
                f"attribute j below {list(self.attribute_sizes)}[j]; got "
                f"{tuple(ids.shape)} {ids.tolist()}."
            )
        return ids


@contextmanager
def control(model: nn.Module, ids: Any) -> Iterator[None]:
    """Give every ControlPrefix adapter in ``model`` these attribute ids while inside."""
    adapters = [m for m in model.modules() if isinstance(m, ControlPrefixAdapter)]
    if not adapters:
        raise ValueError("control(): the model has no ControlPrefix adapter.")
    previous = [a._context_ids for a in adapters]
    for adapter in adapters:
        adapter._context_ids = torch.as_tensor(ids)
    try:
        yield
    finally:
        for adapter, ids_before in zip(adapters, previous, strict=True):
            adapter._context_ids = ids_before


# --- VPT ---------------------------------------------------------------------------------


@register("vpt", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class VPT(AdapterConfig):
    """Visual Prompt Tuning (Jia et al., 2022) on a ViT's ``blocks``.

    Shallow: Z_1 = L_1([x_cls; P; E_0]); deep: Z_i = L_i([x_cls; P_{i-1}; E_{i-1}]) with new
    prompts P_{i-1} at every block, replacing the previous block's prompt outputs. The
    prompt outputs are dropped after the last block, so the final norm and head (class
    token or average pooling) see the original tokens. Not the identity at initialisation.

    Args:
        num_virtual_tokens: prompts p per layer (the paper picks p per task from
            {1, 5, 10, 50, 100, 200}).
        deep: VPT-deep (prompts at every block) instead of VPT-shallow (first block only).
        dropout: dropout on the prompts (the paper's prompt dropout).
        patch_size: the ViT's patch size, used only for the paper's uniform init bound
            sqrt(6 / (3 * patch_size^2 + d)).
        num_prefix_tokens: tokens the prompts go after (1: the class token; timm's
            ``model.num_prefix_tokens`` for register tokens, 0 without a class token).
    """

    num_virtual_tokens: int = 10
    deep: bool = False
    dropout: float = 0.0
    patch_size: int = 16
    num_prefix_tokens: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "num_virtual_tokens")
        check_int(self, "patch_size")
        check_int(self, "num_prefix_tokens", minimum=0)
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)
        if not isinstance(self.deep, bool):
            raise ConfigError(f"VPT.deep must be True or False, got {self.deep!r}.")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if not isinstance(module, nn.Sequential) or len(module) == 0:
            return (
                "VPT wraps a ViT's transformer blocks as one nn.Sequential called as blocks(x) "
                "(timm VisionTransformer.blocks): target 'blocks'"
            )
        if token_dim(module) is None:
            return "no LayerNorm or Linear in the first block to read the token width from"
        return None

    def build(self, module: nn.Module, path: str) -> VPTAdapter:
        return VPTAdapter(module, self)


def token_dim(blocks: nn.Module) -> int | None:
    for layer in blocks[0].modules():
        if isinstance(layer, nn.LayerNorm):
            return layer.normalized_shape[-1]
        if isinstance(layer, nn.Linear):
            return layer.in_features
    return None


class VPTAdapter(Adapter):
    """``prompts`` (1 or depth, p, d): inserted before block 0 (and, deep, replacing the
    prompt positions before every later block), dropped after the last block."""

    def __init__(self, blocks: nn.Sequential, cfg: VPT) -> None:
        super().__init__()
        dim, layers = token_dim(blocks), (len(blocks) if cfg.deep else 1)
        weight = next(blocks.parameters())
        bound = math.sqrt(6.0 / (3 * cfg.patch_size**2 + dim))  # the paper's xavier-style init
        prompts = torch.empty(layers, cfg.num_virtual_tokens, dim, device=weight.device)
        self.prompts = nn.Parameter(prompts.to(adapter_dtype(weight)).uniform_(-bound, bound))
        self.dropout = nn.Dropout(cfg.dropout)
        self.start, self.count = cfg.num_prefix_tokens, cfg.num_virtual_tokens
        self.replaces_base = cfg.deep  # deep runs the blocks itself, to swap prompts between

    def on_attach(self, base: nn.Module) -> None:
        self.train(base.training)  # a new module starts in training mode; follow the model's

    def prompt(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.prompts[layer]).to(like.dtype).expand(like.shape[0], -1, -1)

    def insert(self, x: torch.Tensor) -> torch.Tensor:
        s = self.start
        return torch.cat([x[:, :s], self.prompt(0, x), x[:, s:]], dim=1)

    def replace(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        s, e = self.start, self.start + self.count
        return torch.cat([x[:, :s], self.prompt(layer, x), x[:, e:]], dim=1)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.replaces_base else self.insert(x)

    def run_base(self, x: torch.Tensor, base: nn.Module, *args: Any, **kwargs: Any):
        h = self.insert(x)
        for layer, block in enumerate(base):
            h = block(self.replace(h, layer) if layer else h)
        return h

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        s, e = self.start, self.start + self.count
        return torch.cat([y[:, :s], y[:, e:]], dim=1)


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in float32 under a half-precision base, else in the base's dtype."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


# --- LLaMA-Adapter (V1, with V2 options) -------------------------------------------------

GATES = ("scalar", "per_head")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@register("llama_adapter", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class LlamaAdapter(AdapterConfig):
    """LLaMA-Adapter (Zhang et al., 2023): zero-init gated adaption prompts.

    In an adapted layer with queries q (after rotary embedding), the attention output gains
    g * softmax(q K_p^T / sqrt(d_h)) V_p, where K_p, V_p are the layer's key/value
    projections of K learned prompts and g is a gate initialised to zero, so the model
    starts as the identity. Target decoder layers (``r"model\\.layers\\.\\d+"``); each
    needs ``self_attn`` with q/k/v/o projections (LLaMA, Mistral, Qwen2, ...).

    Args:
        adapter_len: prompt length K (the paper: 10).
        adapter_layers: prompts only in the top L layers of the model (the paper: 30 of
            LLaMA-7B's 32), as PEFT's adaption_prompt; None puts them in every targeted
            layer. Targeted layers below get only the V2 parts (or nothing, as in PEFT,
            where targeting every layer with adapter_layers=L adapts the top L).
        gate: "scalar" (one g per layer, as the paper's equation and PEFT) or
            "per_head" (one per attention head, as the official V2 code).
        gate_tanh: use tanh(g) (the official V2 code) instead of g.
        bias_tuning: V2's bias and scale on every linear layer of the adapted layers,
            y = s * (W x + b), b = 0 and s = 1 at start.
        unlock_norms: V2's norm unlocking: the norms of the adapted layers train (held as
            zero-initialised deltas on their affine parameters).
    """

    adapter_len: int = 10
    adapter_layers: int | None = None
    gate: str = "scalar"
    gate_tanh: bool = False
    bias_tuning: bool = False
    unlock_norms: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "adapter_len")
        if self.adapter_layers is not None:
            check_int(self, "adapter_layers")
        check_choice(self, "gate", GATES)
        for flag in ("gate_tanh", "bias_tuning", "unlock_norms"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"LlamaAdapter.{flag} must be True or False.")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        attn = getattr(module, "self_attn", None)
        projections = [getattr(attn, name, None) for name in PROJECTIONS]
        if attn is None or not all(isinstance(p, nn.Linear) for p in projections):
            return (
                "LLaMA-Adapter wraps a decoder layer whose self_attn has q_proj/k_proj/v_proj/"
                "o_proj linear layers (LLaMA-style); target e.g. r'model\\.layers\\.\\d+'"
            )
        if not hasattr(attn, "config") or getattr(attn, "layer_idx", None) is None:
            return "its self_attn carries no config / layer_idx to size the prompts"
        return None

    def has_prompt(self, attn: nn.Module) -> bool:
        total = text_config(attn).num_hidden_layers
        return self.adapter_layers is None or attn.layer_idx >= total - self.adapter_layers

    def build(self, module: nn.Module, path: str) -> LlamaAdapterLayer:
        return LlamaAdapterLayer(module, self)


class BiasScale(nn.Module):
    """LLaMA-Adapter V2's y -> s * (y + b) on one linear layer's output."""

    def __init__(self, linear: nn.Linear, **opts: Any) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(linear.out_features, **opts))
        self.scale = nn.Parameter(torch.ones(linear.out_features, **opts))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return ((y + self.bias) * self.scale).to(y.dtype)


def is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(weight, nn.Parameter)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class LlamaAdapterLayer(CallAdapter):
    """One decoder layer's adaption prompt ``prompt`` (1, K, d) and ``gate``, plus the V2
    ``linears`` (bias, scale per linear layer) and ``norms`` (affine deltas per norm)."""

    def __init__(self, layer: nn.Module, cfg: LlamaAdapter) -> None:
        super().__init__()
        attn = layer.self_attn
        config = text_config(attn)
        self.num_heads = config.num_attention_heads
        self.head_dim = attn.head_dim
        self.layer_idx, self.total_layers = attn.layer_idx, config.num_hidden_layers
        self.gate_tanh = cfg.gate_tanh
        self.output_bias = attn.o_proj.bias is not None  # see _check_no_output_bias
        opts = {"device": attn.q_proj.weight.device, "dtype": weight_dtype(attn.q_proj)}
        self.has_prompt = cfg.has_prompt(attn)
        if self.has_prompt:
            dim = attn.q_proj.in_features
            self.prompt = nn.Parameter(torch.randn(1, cfg.adapter_len, dim, **opts))
            heads = self.num_heads if cfg.gate == "per_head" else 1
            self.gate = nn.Parameter(torch.zeros(heads, **opts))
        if cfg.bias_tuning:
            self.linears = nn.ModuleDict(
                {
                    module_key(n): BiasScale(m, **opts)
                    for n, m in layer.named_modules()
                    if isinstance(m, nn.Linear)
                }
            )
        if cfg.unlock_norms:
            self.norms = nn.ModuleDict(
                {
                    module_key(n): norm_deltas(m, opts["device"])
                    for n, m in layer.named_modules()
                    if is_norm(m)
                }
            )
        self._running = False  # inside an armed call of the wrapped layer
        self._query = self._rotary = None
        self._in_norm = False

    # -- hooks -------------------------------------------------------------------------

    def on_attach(self, base: nn.Module) -> None:
        self.add_hook(base, self._enter, pre=True)
        self.add_hook(base, self._leave, always_call=True)
        for name, module in base.named_modules():
            if "linears" in self._modules and module_key(name) in self.linears:
                self.add_hook(module, self._bias_scale_hook(self.linears[module_key(name)]))
            if "norms" in self._modules and module_key(name) in self.norms:
                self.add_hook(module, self._norm_hook(self.norms[module_key(name)]))
        if self.has_prompt:
            attn = base.self_attn
            self.add_hook(attn, self._take_rotary, pre=True, with_kwargs=True)
            self.add_hook(attn.q_proj, self._take_query)  # after any V2 hook: final q
            self.add_hook(attn.o_proj, self._add_prompt_attention(attn), pre=True)

    def _enter(self, layer: nn.Module, args: tuple) -> None:
        self._running = self.take_arm()

    def _leave(self, layer: nn.Module, args: tuple, output: Any) -> None:
        self._running, self._query, self._rotary = False, None, None

    def _take_rotary(self, attn: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._running:
            self._rotary = kwargs.get("position_embeddings")

    def _take_query(self, q_proj: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._running:
            self._query = output

    def _bias_scale_hook(self, tuned: BiasScale):
        def hook(linear: nn.Module, args: tuple, output: torch.Tensor):
            return tuned(output) if self._running else None

        return hook

    def _norm_hook(self, deltas: nn.ParameterDict):
        def hook(norm: nn.Module, args: tuple, output: torch.Tensor):
            if not self._running or self._in_norm:
                return None
            params = {
                n: (getattr(norm, n) + d).to(getattr(norm, n).dtype) for n, d in deltas.items()
            }
            self._in_norm = True  # the functional call below runs this hook again
            try:
                return torch.func.functional_call(norm, params, args)
            finally:
                self._in_norm = False

        return hook

    def _add_prompt_attention(self, attn: nn.Module):
        def hook(o_proj: nn.Module, args: tuple):
            if not self._running or self._query is None:
                return None
            hidden = args[0]
            return (hidden + self.prompt_attention(attn, hidden.dtype).to(hidden.dtype), *args[1:])

        return hook

    # -- the gated prompt attention ----------------------------------------------------

    def prompt_attention(self, attn: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """g * softmax(q K_p^T / sqrt(d_h)) V_p, as the attention output (batch, T, H d_h)."""
        query = self._query.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        if self._rotary is not None:
            cos, sin = (t.unsqueeze(1) for t in self._rotary)
            query = query * cos + rotate_half(query) * sin
        prompt = self.prompt.to(dtype)
        keys, values = (self.prompt_heads(proj(prompt)) for proj in (attn.k_proj, attn.v_proj))
        scores = query @ keys.transpose(-1, -2).to(query.dtype) / math.sqrt(self.head_dim)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        gate = self.gate.tanh() if self.gate_tanh else self.gate
        weights = weights * gate.to(query.dtype).view(1, -1, 1, 1)
        out = weights @ values.to(query.dtype)  # (batch, heads, T, head size)
        return out.transpose(1, 2).flatten(2)

    def prompt_heads(self, projected: torch.Tensor) -> torch.Tensor:
        """(1, K, kv heads * d_h) -> (1, heads, K, d_h), repeating grouped kv heads."""
        kv = projected.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        return kv.repeat_interleave(self.num_heads // kv.shape[1], dim=1)


def module_key(name: str) -> str:
    """A module path as a ModuleDict key (dots are not allowed there)."""
    return name.replace(".", "-")


def norm_deltas(norm: nn.Module, device: torch.device) -> nn.ParameterDict:
    deltas = {}
    for name in ("weight", "bias"):
        value = getattr(norm, name, None)
        if isinstance(value, nn.Parameter):
            zeros = torch.zeros(value.shape, device=device, dtype=adapter_dtype(value))
            deltas[name] = nn.Parameter(zeros)
    return nn.ParameterDict(deltas)


# --- HF PEFT spelling --------------------------------------------------------------------


def backbone_path(model: nn.Module) -> str:
    """Where PEFT's prompt learning acts: the backbone of a transformers task model."""
    prefix = getattr(model, "base_model_prefix", "")
    if (
        prefix
        and isinstance(getattr(model, prefix, None), nn.Module)
        and prefix in dict(model.named_children())
    ):
        return prefix
    raise CheckpointError(
        f"{type(model).__name__} has no transformers backbone child (base_model_prefix "
        f"{prefix!r}); omnipeft's prompt methods wrap the backbone inside a task model "
        "(e.g. LlamaForCausalLM.model, BertForSequenceClassification.bert), so load the "
        "adapter into such a model."
    )


def peft_task_type(model: nn.Module) -> str:
    """PEFT's task type for a transformers model class (it picks PEFT's model wrapper)."""
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def existing_names(model: nn.Module, names: list | None) -> tuple[str, ...] | None:
    """PEFT lists both 'classifier' and 'score' for classifiers; keep what the model has."""
    paths = [p for p, _ in model.named_modules()]
    kept = [
        n for n in dict.fromkeys(names or []) if any(p == n or p.endswith("." + n) for p in paths)
    ]
    return tuple(kept) or None


def only_adapter(adapters: dict[str, Adapter], model: nn.Module) -> tuple[str, Adapter]:
    (path, adapter), *rest = adapters.items()
    if rest or path != backbone_path(model):
        raise CheckpointError(
            f"PEFT's prompt learning acts on the task model's backbone "
            f"({backbone_path(model)!r}); this adapter wraps {sorted(adapters)}, so PEFT would "
            "compute something else. It cannot be exported."
        )
    return path, adapter


def take_prompt_embeddings(tensors: dict[str, torch.Tensor], peft_type: str) -> torch.Tensor:
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if extra or "prompt_embeddings" not in tensors:
        raise CheckpointError(
            f"this PEFT {peft_type} folder holds {sorted(tensors)}; omnipeft reads exactly "
            "'prompt_embeddings' (multitask prompt tuning and P-tuning are not supported)."
        )
    return tensors["prompt_embeddings"]


def _prompt_from_peft(pc: dict, tensors: dict, model: nn.Module):
    value = take_prompt_embeddings(tensors, "PROMPT_TUNING")
    path = backbone_path(model)
    backbone = model.get_submodule(path)
    width = getattr(backbone, "base_layer", backbone).get_input_embeddings().weight.shape[1]
    if value.dim() != 2 or value.shape[1] != width:
        raise CheckpointError(
            f"the PEFT prompt is {tuple(value.shape)}, but this model's embeddings are "
            f"{width} wide; load it into the model it was trained on."
        )
    cfg = PromptTuning(
        targets=(path,),
        num_virtual_tokens=value.shape[0],
        init="normal",  # the values come from the file; no tokenizer is loaded
        modules_to_save=existing_names(model, pc.get("modules_to_save")),
    )
    return cfg, {path: {"prompt": value}}


def _prompt_to_peft(cfg: PromptTuning, adapters: dict, model: nn.Module):
    _, adapter = only_adapter(adapters, model)
    layers, _, _ = kv_geometry(model)
    fields = {
        "task_type": peft_task_type(model),
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": adapter.prompt.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": text_config(model).num_attention_heads,
        "num_layers": layers,
        "prompt_tuning_init": "SAMPLE_VOCAB" if cfg.init == "vocab" else "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }
    return fields, {"prompt_embeddings": adapter.prompt.detach()}


def _prefix_from_peft(pc: dict, tensors: dict, model: nn.Module):
    value = take_prompt_embeddings(tensors, "PREFIX_TUNING")
    path = backbone_path(model)
    backbone = model.get_submodule(path)
    layers, kv_heads, head_dim = kv_geometry(getattr(backbone, "base_layer", backbone))
    width = layers * 2 * kv_heads * head_dim
    if value.dim() != 2 or value.shape[1] != width:
        raise CheckpointError(
            f"the PEFT prefix is {tuple(value.shape)}, but this model needs (tokens, {width}) "
            f"= (tokens, {layers} layers x 2 x {kv_heads} kv heads x {head_dim}); load it "
            "into the model it was trained on."
        )
    cfg = PrefixTuning(
        targets=(path,),
        num_virtual_tokens=value.shape[0],
        projection=False,  # PEFT saves MLP(P'), the keys/values themselves
        modules_to_save=existing_names(model, pc.get("modules_to_save")),
    )
    table = value.reshape(value.shape[0], layers, 2, kv_heads * head_dim)
    return cfg, {path: {"prefix": table}}


def _prefix_to_peft(cfg: PrefixTuning, adapters: dict, model: nn.Module):
    _, adapter = only_adapter(adapters, model)
    if isinstance(adapter, ControlPrefixAdapter):
        raise CheckpointError("HF PEFT has no Control Prefixes; it cannot be exported.")
    with torch.no_grad():
        table = adapter.key_value_table()[0]
    fields = {
        "task_type": peft_task_type(model),
        "num_virtual_tokens": cfg.num_virtual_tokens,
        # PEFT sizes the prefix as num_attention_heads x (token_dim / heads) per layer, and
        # for grouped-query attention counts key/value heads there.
        "token_dim": adapter.kv_heads * adapter.head_dim,
        "num_attention_heads": adapter.kv_heads,
        "num_layers": adapter.num_layers,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": cfg.encoder_hidden_size,
        "prefix_projection": cfg.projection,
        "init_weights": None,
    }
    return fields, {"prompt_embeddings": table.reshape(table.shape[0], -1)}


register_peft_format(
    PeftFormat(
        peft_type="PROMPT_TUNING",
        method="prompt_tuning",
        import_model=_prompt_from_peft,
        export_model=_prompt_to_peft,
        key_prefix=PROMPT_LEARNING_KEY_PREFIX,
        neutral={"num_transformer_submodules": 1},
    )
)

register_peft_format(
    PeftFormat(
        peft_type="PREFIX_TUNING",
        method="prefix_tuning",
        import_model=_prefix_from_peft,
        export_model=_prefix_to_peft,
        key_prefix=PROMPT_LEARNING_KEY_PREFIX,
        neutral={"num_transformer_submodules": 1},
    )
)


# omnipeft adds the gated prompt attention to the attention output before o_proj, as the
# paper's code; PEFT adds o_proj(prompt attention), which counts o_proj's bias twice.
OUTPUT_BIAS = (
    "this layer's o_proj has a bias, which HF PEFT's adaption_prompt adds a second time "
    "(it projects the prompt attention separately); the outputs would differ, so this "
    "adapter cannot move between PEFT and omnipeft exactly."
)


def _check_no_output_bias(layer: nn.Module, tensors: dict) -> dict:
    if layer.self_attn.o_proj.bias is not None:
        raise CheckpointError(OUTPUT_BIAS)
    return tensors


def _llama_adapter_from_peft(pc: dict) -> LlamaAdapter:
    if pc.get("target_modules") not in (None, "self_attn"):
        raise CheckpointError(
            f"this PEFT adaption prompt targets {pc['target_modules']!r}; omnipeft's "
            "LLaMA-Adapter reads LLaMA-style 'self_attn' modules only."
        )
    return LlamaAdapter(
        targets=r"(.*\.)?layers\.\d+",
        adapter_len=int(pc["adapter_len"]),
        adapter_layers=int(pc["adapter_layers"]),
    )


def _llama_adapter_to_peft(cfg: LlamaAdapter, adapters: dict) -> dict:
    v2 = cfg.bias_tuning or cfg.unlock_norms or cfg.gate != "scalar" or cfg.gate_tanh
    if v2:
        raise CheckpointError(
            "PEFT's adaption_prompt has one ungated-by-tanh scalar gate per layer and no V2 "
            "parts; this LlamaAdapter uses gate/gate_tanh/bias_tuning/unlock_norms options, "
            "so it cannot be exported."
        )
    if any(a.output_bias for a in adapters.values()):
        raise CheckpointError(OUTPUT_BIAS)
    prompted = sorted(a.layer_idx for a in adapters.values() if a.has_prompt)
    total = next(iter(adapters.values())).total_layers
    if prompted != list(range(total - len(prompted), total)):
        raise CheckpointError(
            f"PEFT's adaption_prompt adapts the top adapter_layers layers; this adapter has "
            f"prompts in layers {prompted} of {total}, so it cannot be exported."
        )
    return {
        "target_modules": "self_attn",
        "exclude_modules": None,
        "adapter_len": cfg.adapter_len,
        "adapter_layers": len(prompted),
    }


register_peft_format(
    PeftFormat(
        peft_type="ADAPTION_PROMPT",
        method="llama_adapter",
        tensor_names={"self_attn.adaption_prompt": "prompt", "self_attn.adaption_gate": "gate"},
        config_from_peft=_llama_adapter_from_peft,
        config_to_peft=_llama_adapter_to_peft,
        import_tensors=_check_no_output_bias,
    )
)
