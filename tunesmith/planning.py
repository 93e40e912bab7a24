"""Planning tools: which approach to take, and what a training run will cost.

Two parts, both pure arithmetic (no torch):

* :func:`recommend` scores prompting, RAG and fine-tuning for a :class:`UseCase`
  with the rules of the brief (SEED-FACTS) and then weighs the monthly budget
  against an estimate of what fine-tuning costs (the guide collects the budget
  but never uses it).
* :func:`estimate` gives memory for full, LoRA and QLoRA training and the time on
  each known GPU. Where the guide's formulas are naive the better version is
  used, and every number says which formula made it (``docs/planning.md``):

  - parameter counts and LoRA parameters come from the model's real shapes
    (``r * (in + out)`` per adapted matrix), not a hard-coded 4096 x 32;
  - activations follow Korthikanti et al. (2022), ``s*b*h*(34 + 5*a*s/h)`` bytes
    per layer in 16-bit, or ``2*s*b*h`` per layer with gradient checkpointing,
    plus the logits ``b*s*V*(4 + 2)`` bytes (large for small models with big vocabularies);
  - FLOPs are ``6*P*T`` for full training (the guide's rule) plus attention
    ``12*L*h*s*T``; LoRA and QLoRA skip the frozen weights' gradients:
    ``4*P*T``; time divides by the GPU's peak times a utilisation (default 0.4,
    the guide implicitly assumes 1.0).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from tunesmith.core.errors import TunesmithError

GB = 1024**3

# --------------------------------------------------------------------------- GPUs
#: name -> (memory GiB, dense fp16/bf16 TFLOP/s, typical on-demand USD per hour)
#: Memory and TFLOP/s are from SEED-FACTS; prices are assumptions (2024 cloud
#: on-demand list prices, rounded) used only for the budget check.
GPUS: dict[str, tuple[float, float, float]] = {
    "A100-80GB": (80, 312, 1.80),
    "A100-40GB": (40, 312, 1.30),
    "H100-80GB": (80, 989, 2.50),
    "A10G-24GB": (24, 125, 1.00),
    "RTX4090-24GB": (24, 165, 0.70),
    "RTX3090-24GB": (24, 71, 0.40),
}

#: fraction of GPU memory usable for training (CUDA context, fragmentation)
MEMORY_HEADROOM = 0.9

Complexity = Literal["simple", "moderate", "complex"]
Frequency = Literal["daily", "weekly", "monthly", "static"]


# --------------------------------------------------------------------------- use cases
@dataclass
class UseCase:
    """A use-case profile (the inputs of ``plan recommend``)."""

    name: str = "use case"
    data_size: int = 0
    update_frequency: Frequency = "static"
    complexity: Complexity = "moderate"
    latency_ms: float = 1000.0
    monthly_budget_usd: float | None = None
    needs_domain_knowledge: bool = False
    needs_format: bool = False
    needs_tone: bool = False
    #: base model size (billions) used to price fine-tuning against the budget
    model_size_b: float = 7.0

    def __post_init__(self) -> None:
        if self.update_frequency not in ("daily", "weekly", "monthly", "static"):
            raise TunesmithError(f"update_frequency must be daily, weekly, monthly or static, got '{self.update_frequency}'")
        if self.complexity not in ("simple", "moderate", "complex"):
            raise TunesmithError(f"complexity must be simple, moderate or complex, got '{self.complexity}'")
        if self.data_size < 0:
            raise TunesmithError("data_size cannot be negative")


#: The guide's worked examples, usable as ``plan recommend --example NAME``.
EXAMPLES: dict[str, UseCase] = {
    "support-bot": UseCase("customer support bot", 10000, "weekly", "moderate", 2000, 2000, True, True, True),
    "code-completion": UseCase("code completion", 50000, "monthly", "complex", 500, 5000, False, True, False),
    "document-qa": UseCase("document QA", 500, "daily", "moderate", 3000, 500, True, False, False),
    "sentiment": UseCase("sentiment analysis", 10000, "static", "simple", 100, 1000, False, True, False),
    "creative-writing": UseCase("creative writing", 50, "static", "simple", 10000, 100, False, False, True),
}

RETRAINS_PER_MONTH = {"daily": 30.0, "weekly": 4.3, "monthly": 1.0, "static": 1.0 / 12}


@dataclass
class Recommendation:
    approach: Literal["prompting", "rag", "fine-tuning", "hybrid"]
    scores: dict[str, float]
    reasons: dict[str, list[str]]
    samples_needed: int
    budget: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def samples_needed(complexity: Complexity = "moderate", capability: Literal["high", "medium", "low"] = "medium") -> int:
    """Examples a fine-tune needs: 1000 x complexity (1, 2.5, 5) x base capability (0.5, 1, 2)."""
    c = {"simple": 1.0, "moderate": 2.5, "complex": 5.0}[complexity]
    k = {"high": 0.5, "medium": 1.0, "low": 2.0}[capability]
    return int(round(1000 * c * k))


def recommend(use: UseCase) -> Recommendation:
    """Score the approaches (each capped at 1.0) and pick one, with the reasons."""
    ft: list[tuple[float, str]] = []
    rag: list[tuple[float, str]] = []
    pr: list[tuple[float, str]] = []
    n = use.data_size
    if n >= 10_000:
        ft.append((0.3, f"{n} examples is plenty for fine-tuning (>= 10k)"))
    elif n >= 1_000:
        ft.append((0.2, f"{n} examples meets the recommended 1,000"))
    elif n >= 100:
        ft.append((0.1, f"{n} examples meets the minimum of 100"))
    if use.update_frequency == "static":
        ft.append((0.2, "the knowledge is static, so a trained model stays current"))
    elif use.update_frequency == "monthly":
        ft.append((0.1, "monthly updates allow periodic re-training"))
    else:
        rag.append((0.3, f"{use.update_frequency} updates favour retrieval over re-training"))
    if use.complexity == "complex":
        ft.append((0.2, "complex tasks gain most from training"))
    elif use.complexity == "moderate":
        rag.append((0.15, "moderate complexity suits retrieval plus a capable model"))
    else:
        pr.append((0.4, "a simple task is often solved by a good prompt"))
    if use.needs_format:
        ft.append((0.15, "a specific output format is learnt reliably by fine-tuning"))
    if use.needs_tone:
        ft.append((0.15, "a specific tone or house style is learnt by fine-tuning"))
    if use.needs_domain_knowledge:
        rag.append((0.25, "domain knowledge is best kept in a retrievable store"))
    if n < 1_000:
        rag.append((0.2, f"{n} examples is too few to teach knowledge by training"))
    if n < 100:
        pr.append((0.3, f"{n} examples is below the fine-tuning minimum of 100"))
    if use.latency_ms > 5000:
        pr.append((0.2, "a relaxed latency budget (> 5 s) leaves room for long prompts"))

    budget = _budget_check(use)
    if budget:
        ft.extend(budget.pop("_ft"))
        rag.extend(budget.pop("_rag"))
        pr.extend(budget.pop("_pr"))

    def total(items: list[tuple[float, str]]) -> float:
        return round(max(0.0, min(1.0, sum(w for w, _ in items))), 4)

    scores = {"fine-tuning": total(ft), "rag": total(rag), "prompting": total(pr)}
    if scores["fine-tuning"] > 0.5 and scores["rag"] > 0.5:
        approach = "hybrid"
        summary = "hybrid: fine-tune for format and tone, retrieve the knowledge (RAG)"
    else:
        # ties go to the cheaper approach: prompting, then RAG, then fine-tuning
        order = ["prompting", "rag", "fine-tuning"]
        approach = max(order, key=lambda k: (scores[k], -order.index(k)))
        summary = {
            "prompting": "prompting first: it may solve this without training",
            "rag": "RAG: keep the knowledge in a store the model retrieves from",
            "fine-tuning": "fine-tuning: train a PEFT adapter on your examples",
        }[approach]
    reasons = {
        "fine-tuning": [_fmt(w, r) for w, r in ft],
        "rag": [_fmt(w, r) for w, r in rag],
        "prompting": [_fmt(w, r) for w, r in pr],
    }
    need = samples_needed(use.complexity)
    if approach in ("fine-tuning", "hybrid") and n < need:
        summary += f"; collect about {need} examples for a {use.complexity} task (you have {n})"
    return Recommendation(approach, scores, reasons, need, budget, summary)


def _fmt(weight: float, reason: str) -> str:
    return f"{weight:+.2f} {reason}"


def _budget_check(use: UseCase) -> dict[str, Any]:
    """Price a LoRA fine-tune of the profile's model and weigh it against the budget."""
    if use.monthly_budget_usd is None:
        return {}
    samples = max(use.data_size, 100)
    est = estimate(params_b=use.model_size_b, samples=samples, epochs=3, batch_size=4, seq_len=512)
    lora = est.methods["lora"]
    gpu = lora.cheapest_gpu
    if gpu is None:
        run_cost = math.inf
        gpu_name = "none of the known GPUs"
    else:
        run_cost = lora.per_gpu[gpu]["hours"] * GPUS[gpu][2]
        gpu_name = gpu
    runs = RETRAINS_PER_MONTH[use.update_frequency]
    monthly = run_cost * runs
    out: dict[str, Any] = {
        "monthly_budget_usd": use.monthly_budget_usd,
        "fine_tune_run_usd": round(run_cost, 2) if math.isfinite(run_cost) else None,
        "fine_tune_runs_per_month": runs,
        "fine_tune_monthly_usd": round(monthly, 2) if math.isfinite(monthly) else None,
        "gpu": gpu_name,
        "_ft": [],
        "_rag": [],
        "_pr": [],
    }
    b = use.monthly_budget_usd
    if not math.isfinite(monthly) or monthly > b:
        out["_ft"].append((-0.3, f"re-training a {use.model_size_b:g}B LoRA costs about ${monthly:,.0f}/month, over the ${b:,.0f} budget"))
        out["_pr"].append((0.1, "the budget favours the approach with no training cost"))
    elif monthly > 0.5 * b:
        out["_ft"].append((-0.1, f"re-training costs about ${monthly:,.0f}/month, over half the ${b:,.0f} budget"))
    else:
        out["_ft"].append((0.0, f"re-training costs about ${monthly:,.2f}/month on {gpu_name}, within the ${b:,.0f} budget"))
    if b < 50:
        out["_rag"].append((-0.1, f"a ${b:,.0f} budget leaves little for hosting a vector store"))
    return out


# --------------------------------------------------------------------------- model shapes
@dataclass
class ModelShape:
    """What the estimates need to know about a decoder-only transformer."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = True
    head_dim: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden // self.heads

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block (Llama naming)."""
        h, d = self.hidden, self.head_dim or self.hidden // self.heads
        return {
            "q_proj": (h, self.heads * d),
            "k_proj": (h, self.kv_heads * d),
            "v_proj": (h, self.kv_heads * d),
            "o_proj": (self.heads * d, h),
            "gate_proj": (h, self.intermediate),
            "up_proj": (h, self.intermediate),
            "down_proj": (self.intermediate, h),
        }

    @property
    def params(self) -> int:
        """Exact parameter count of a Llama-style model (RMSNorm weights, no biases)."""
        block = sum(i * o for i, o in self.linear_shapes.values()) + 2 * self.hidden
        emb = self.vocab * self.hidden
        return self.layers * block + emb + (0 if self.tie_embeddings else emb) + self.hidden

    def lora_params(self, r: int, target_modules: Iterable[str] | str) -> int:
        """LoRA parameters: ``r * (in + out)`` per adapted matrix per layer."""
        shapes = self.linear_shapes
        if target_modules == "all-linear":
            names = list(shapes)
        else:
            names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
            unknown = [n for n in names if n not in shapes]
            if unknown:
                raise TunesmithError(
                    f"unknown target module(s) {', '.join(unknown)}", hint="use " + ", ".join(shapes) + " or all-linear"
                )
        return self.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)

    @classmethod
    def from_params(cls, params_b: float) -> "ModelShape":
        """A Llama-like shape for a size in billions (hidden from 12*L*h^2 with L ~ h/128)."""
        if params_b <= 0:
            raise TunesmithError("the model size must be positive")
        # P ~ 12 * L * h^2 with L = h / 128  ->  h = (P * 128 / 12) ** (1/3)
        h = (params_b * 1e9 * 128 / 12) ** (1 / 3)
        h = max(64, int(round(h / 64)) * 64)
        layers = max(1, int(round(params_b * 1e9 / (12 * h * h))))
        heads = max(1, h // 128)
        return cls(hidden=h, layers=layers, heads=heads, kv_heads=heads, intermediate=int(h * 8 / 3) // 64 * 64 or 64,
                   vocab=32000, tie_embeddings=False, name=f"{params_b:g}B (assumed Llama shape)")

    @classmethod
    def from_config(cls, cfg: dict, name: str = "") -> "ModelShape":
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            return cls(
                hidden=hidden,
                layers=int(cfg["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
                vocab=int(cfg["vocab_size"]),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                head_dim=cfg.get("head_dim"),
                name=name,
            )
        except KeyError as exc:
            raise TunesmithError(f"model config lacks {exc.args[0]}", hint="expected a decoder-only (Llama-style) config") from None

    @classmethod
    def from_gguf(cls, path: Path) -> "ModelShape":
        import gguf

        reader = gguf.GGUFReader(str(path))

        def field_value(key: str) -> Any:
            f = reader.fields.get(key)
            if f is None:
                return None
            return f.parts[f.data[0]].tolist()[0] if f.data else None

        arch_field = reader.fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        vocab_f = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(vocab_f.data) if vocab_f is not None else int(field_value(f"{arch}.vocab_size") or 0)
        hidden = int(field_value(f"{arch}.embedding_length"))
        heads = int(field_value(f"{arch}.attention.head_count"))
        tensor_names = {t.name for t in reader.tensors}
        return cls(
            hidden=hidden,
            layers=int(field_value(f"{arch}.block_count")),
            heads=heads,
            kv_heads=int(field_value(f"{arch}.attention.head_count_kv") or heads),
            intermediate=int(field_value(f"{arch}.feed_forward_length")),
            vocab=vocab,
            tie_embeddings="output.weight" not in tensor_names,
            name=path.name,
        )


def model_shape(source: str | Path, *, registries: Any = None) -> ModelShape:
    """Read a model's shape from a folder or ``config.json``, a ``.gguf`` file, or a model source name."""
    p = Path(source).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        p = p / "config.json"
    if p.is_file() and p.suffix == ".json":
        return ModelShape.from_config(json.loads(p.read_text(encoding="utf-8")), name=str(p.parent.name))
    if p.is_file() and p.suffix == ".gguf":
        return ModelShape.from_gguf(p)
    if p.exists():
        raise TunesmithError(f"{p}: not a model folder, config.json or .gguf file")
    # a model-source plugin name, e.g. "default"
    if registries is None:
        from tunesmith.core.plugins import get_registries

        registries = get_registries()
    src = registries.model_sources.get(str(source))
    opts_model = getattr(src, "Options", None)
    folder = Path(src.resolve(opts_model() if opts_model is not None else None))
    return model_shape(folder, registries=registries)


# --------------------------------------------------------------------------- estimates
@dataclass
class MethodEstimate:
    method: str
    trainable_params: int
    memory_gb: dict[str, float]  # weights, gradients, optimizer, activations, total
    flops: float
    per_gpu: dict[str, dict[str, Any]]  # gpu -> {fits, hours}
    formula: str

    @property
    def total_gb(self) -> float:
        return self.memory_gb["total"]

    @property
    def fits_on(self) -> list[str]:
        return [g for g, v in self.per_gpu.items() if v["fits"]]

    @property
    def cheapest_gpu(self) -> str | None:
        fits = self.fits_on
        if not fits:
            return None
        return min(fits, key=lambda g: self.per_gpu[g]["hours"] * GPUS[g][2])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fits_on"] = self.fits_on
        return d


@dataclass
class Estimate:
    model: str
    params: int
    shape: dict[str, Any]
    tokens: int
    settings: dict[str, Any]
    methods: dict[str, MethodEstimate]
    guide: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "params": self.params,
            "shape": self.shape,
            "tokens": self.tokens,
            "settings": self.settings,
            "methods": {k: v.to_dict() for k, v in self.methods.items()},
            "guide": self.guide,
        }


def activation_bytes(shape: ModelShape, batch: int, seq: int, *, checkpointing: bool, bytes_per_value: int = 2) -> float:
    """Memory of the activations kept for backward (Korthikanti et al. 2022) plus fp32 logits.

    Without recomputation a layer keeps ``s*b*h*(34 + 5*a*s/h)`` bytes at 16 bits
    (the ``5*a*s/h`` term is the attention matrix; memory-efficient attention
    drops it, but eager attention on small models keeps it). With gradient
    checkpointing each layer keeps only its input (``2*s*b*h``) and one layer is
    recomputed at a time. The logits (``b*s*V``: the fp32 log-softmax the loss
    keeps, plus the 16-bit logits of a 16-bit model) dominate for small models with
    large vocabularies.
    """
    s, b, h, a = seq, batch, shape.hidden, shape.heads
    scale = bytes_per_value / 2
    per_layer = s * b * h * (34 + 5 * a * s / h) * scale
    if checkpointing:
        layers = shape.layers * 2 * s * b * h * scale + per_layer
    else:
        layers = shape.layers * per_layer
    # the loss keeps the log-softmax of the logits in fp32; a 16-bit model keeps
    # its 16-bit logits as well (they are upcast for the loss)
    logits = b * s * shape.vocab * (4 + (bytes_per_value if bytes_per_value < 4 else 0))
    return layers + logits


def estimate(
    *,
    params_b: float | None = None,
    shape: ModelShape | None = None,
    samples: int = 1000,
    epochs: float = 3,
    batch_size: int = 4,
    seq_len: int = 2048,
    tokens_per_sample: int | None = None,
    lora_r: int = 8,
    target_modules: Iterable[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
    precision: Literal["bf16", "fp16", "fp32"] = "bf16",
    gradient_checkpointing: bool = True,
    utilization: float = 0.4,
    gpus: Iterable[str] | None = None,
) -> Estimate:
    """Memory and time of full, LoRA and QLoRA training (see the module docstring)."""
    if shape is None:
        if params_b is None:
            raise TunesmithError("give a model size (params_b) or a model shape")
        shape = ModelShape.from_params(params_b)
    if not 0 < utilization <= 1:
        raise TunesmithError("utilization must be in (0, 1]")
    for name, v in (("samples", samples), ("batch_size", batch_size), ("seq_len", seq_len)):
        if v <= 0:
            raise TunesmithError(f"{name} must be positive")
    P = shape.params
    wbytes = {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    per_sample = min(tokens_per_sample or seq_len, seq_len)
    tokens = int(samples * epochs * per_sample)
    lora_p = shape.lora_params(lora_r, target_modules)
    attn_flops_per_token = 12 * shape.layers * shape.hidden * per_sample
    gpu_names = list(gpus) if gpus is not None else list(GPUS)
    for g in gpu_names:
        if g not in GPUS:
            raise TunesmithError(f"unknown GPU '{g}'", hint="known: " + ", ".join(GPUS))

    def method(name: str, weights_b: float, trainable: int, grad_flops: float, ckpt: bool, formula: str) -> MethodEstimate:
        weights = P * weights_b
        # full training keeps gradients in the weights' precision; adapters train in fp32
        grads = trainable * (wbytes if name == "full" else 4)
        # Adam keeps two fp32 moments per trainable parameter; with 16-bit
        # weights a trainable fp32 master copy is kept as well (mixed precision)
        optim = trainable * (8 + (4 if wbytes == 2 and name == "full" else 0))
        if name != "full":
            weights += trainable * 4  # adapters are trained in fp32
        act = activation_bytes(shape, batch_size, per_sample, checkpointing=ckpt, bytes_per_value=min(wbytes, 2) if name == "full" else 2)
        total = weights + grads + optim + act
        # forward 2P, backward 2P for activations, +2P for weight gradients (full only)
        recompute = 2 * P if ckpt else 0
        flops = tokens * (grad_flops * P + recompute + attn_flops_per_token)
        per_gpu: dict[str, dict[str, Any]] = {}
        for g in gpu_names:
            mem, tflops, _price = GPUS[g]
            per_gpu[g] = {
                "fits": total / GB <= mem * MEMORY_HEADROOM,
                "hours": round(flops / (tflops * 1e12 * utilization) / 3600, 4),
            }
        mem_gb = {
            "weights": weights / GB,
            "gradients": grads / GB,
            "optimizer": optim / GB,
            "activations": act / GB,
            "total": total / GB,
        }
        return MethodEstimate(name, trainable, {k: round(v, 4) for k, v in mem_gb.items()}, flops, per_gpu, formula)

    methods = {
        "full": method("full", wbytes, P, 6, gradient_checkpointing,
                       "P*w + P*w (grads) + P*(8+4) (Adam + fp32 master) + activations; FLOPs 6*P*T + 12*L*h*s*T"),
        "lora": method("lora", wbytes, lora_p, 4, gradient_checkpointing,
                       "P*w + r*(in+out) per matrix x (4+w+8) + activations; FLOPs 4*P*T + 12*L*h*s*T"),
        # NF4 stores 4 bits per weight plus one fp32 absmax per 64 weights (double
        # quantisation shrinks that to ~8 bits per 64): ~0.515 bytes per weight
        "qlora": method("qlora", 0.515, lora_p, 4, True,
                        "P*0.515 (nf4 + double-quant scales) + LoRA as above + checkpointed activations"),
    }
    Pb = P / 1e9
    # the guide's formulas, verbatim, for comparison
    guide = {
        "full_gb": round(Pb * 2 + Pb * 2 + Pb * 8 + batch_size * per_sample * Pb * 0.1, 3),
        "lora_gb": round(Pb * 2 + 2 * lora_r * 4096 * 32 * 4 / 1e9 * 12 + batch_size * per_sample * Pb * 0.05, 3),
        "qlora_gb": round(Pb * 0.5 + 2 * lora_r * 4096 * 32 * 4 / 1e9 * 12 + batch_size * per_sample * Pb * 0.02, 3),
        "time_hours_a100": round(6 * P * tokens / (312e12) / 3600, 4),
    }
    settings = {
        "samples": samples,
        "epochs": epochs,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_sample": per_sample,
        "lora_r": lora_r,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "precision": precision,
        "gradient_checkpointing": gradient_checkpointing,
        "utilization": utilization,
    }
    return Estimate(shape.name or f"{Pb:.3g}B", P, asdict(shape), tokens, settings, methods, guide)
