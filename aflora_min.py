"""aflora_min: LoRA, ELoRA and AFLoRA in one readable file (torch only).

Papers
  LoRA   Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685
  ELoRA  Kopiczko et al. 2023, "VeRA: Vector-based Random Matrix Adaptation", arXiv 2310.11454
         (called ELoRA in the AFLoRA paper)
  AFLoRA Liu et al. 2024, "AFLoRA: Adaptive Freezing of Low Rank Adaptation in Parameter
         Efficient Fine-Tuning of Large Models", ACL 2024, arXiv 2403.13269

Every adapter wraps a frozen nn.Linear y = W0 x (+ bias) as `base_layer` and adds an update ΔW:
  LoRA   ΔW = (alpha / r) · B A                 A: (r, in), B: (out, r) trainable
  ELoRA  ΔW = diag(b) B diag(d) A               A, B frozen random; d: (r,), b: (out,) trainable
  AFLoRA ΔW = diag(b) B diag(d) A               as ELoRA at small r, but A and B start trainable
                                                and are frozen one by one during training by a
                                                sensitivity score and a cubic schedule.
Read top to bottom: adapters, injection, the freezing score and schedule, utilities, then export
and distributed training (PEFT LoRA export, exact resume, DDP).
Where the AFLoRA paper and its released GLUE code differ, this file follows the code (no alpha/r
scaling for ELoRA/AFLoRA; the quantile freezing rule; sensitivity = |grad|).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import warnings

import torch
import torch.nn as nn

__all__ = [
    "LoRALinear", "ELoRALinear", "AFLoRALinear", "add_adapters", "adapter_layers",
    "layer_seed", "cubic_schedule", "AFLoRAFreezer", "count_parameters", "print_trainable_parameters",
    "merge_adapters", "unmerge_adapters", "merge_and_unload", "disable_adapters", "adapter_state_dict",
    "projection_fingerprint", "trainer_callback",
    "load_adapter_state_dict", "lora_factors", "export_lora", "save_checkpoint", "load_checkpoint",
    "rewrap_ddp",
]


# ----------------------------------------------------------------------------------------------
# Adapters


def _kaiming_uniform(shape, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with a=0: U(-sqrt(6/fan_in), +sqrt(6/fan_in)), drawn on the CPU so that
    CPU and GPU runs with the same seed get bit-identical matrices."""
    bound = math.sqrt(6.0 / fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's layers): y = x @ W + b with W stored (in, out). Recognised by
    duck typing, so that this file imports only torch."""
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, torch.Tensor) \
        and w.dim() == 2


def _is_int(value) -> bool:
    """A whole number (Python or numpy int), not a bool or a float."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class _AdapterLinear(nn.Module):
    """Shared plumbing: wrap `base_layer`, freeze it, merge/unmerge through `delta_weight()`.

    `base_layer` is an nn.Linear (weight stored (out, in)) or a transformers Conv1D (weight stored
    (in, out), `fan_in_fan_out`); `base_weight()` is the (out, in) view either way.
    Adapter tensors are created in fp32, also on an fp16/bf16 base (ΔW and merges are computed in
    fp32); the adapter path runs in the adapters' dtype and casts its output to the base's. A later
    `model.to(dtype)` / `.half()` casts the adapters too, like every other parameter.
    """

    def __init__(self, base_layer: nn.Linear, r: int):
        super().__init__()
        if isinstance(base_layer, _AdapterLinear):
            raise ValueError("this layer already has an adapter; adapters cannot be added twice "
                             "(build the adapter on the original nn.Linear)")
        if not _adaptable(base_layer):
            raise ValueError(f"adapters wrap nn.Linear (or transformers Conv1D) layers, got "
                             f"{type(base_layer).__name__}; choose targets that name nn.Linear modules")
        if not _is_int(r) or r <= 0:
            raise ValueError(f"rank r must be a positive integer, got {r!r}")
        self.base_layer = base_layer
        self.fan_in_fan_out = _is_conv1d(base_layer)
        self.r = int(r)
        self.merged = False
        self.disabled = False
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base_layer.weight.shape[0 if self.fan_in_fan_out else 1]

    @property
    def out_features(self) -> int:
        return self.base_layer.weight.shape[1 if self.fan_in_fan_out else 0]

    def base_weight(self) -> torch.Tensor:  # (out, in), a view of the base's weight
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def _param(self, tensor: torch.Tensor, trainable: bool = True) -> nn.Parameter:
        w = self.base_layer.weight
        return nn.Parameter(tensor.to(device=w.device, dtype=torch.float32), requires_grad=trainable)

    def delta_weight(self) -> torch.Tensor:  # (out, in), in the adapters' dtype (fp32 unless cast)
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        return y + self.adapter_forward(x.to(self.lora_A.dtype)).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + ΔW (in fp32, cast back to the base dtype). A second merge warns and does nothing."""
        if self.merged:
            warnings.warn("adapter is already merged; merge() did nothing", stacklevel=2)
            return
        w = self.base_weight()
        w.copy_((w.float() + self.delta_weight().float()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - ΔW: restores W0 up to the rounding of one add and one subtract."""
        if not self.merged:
            warnings.warn("adapter is not merged; unmerge() did nothing", stacklevel=2)
            return
        w = self.base_weight()
        w.copy_((w.float() - self.delta_weight().float()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, merged={self.merged}"


class LoRALinear(_AdapterLinear):
    """LoRA: h = W0 x + (alpha/r) · B A x.  A ~ kaiming-uniform (PEFT's a=sqrt(5)), B = 0.

    alpha=None means alpha = r (scaling 1, PEFT's default at r=8).
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float | None = None,
                 dropout: float = 0.0):
        super().__init__(base_layer, r)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.alpha = float(r if alpha is None else alpha)
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive (the update is scaled by alpha/r; 0 trains nothing), "
                             f"got {alpha!r}")
        self.scaling = self.alpha / r
        A = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A = self._param(A)                                   # (r, in)
        self.lora_B = self._param(torch.zeros(self.out_features, r))   # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha/r) · B A,  (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.dropout(x) @ self.lora_A.T) * self.scaling) @ self.lora_B.T  # scale the (..., r) part


class ELoRALinear(_AdapterLinear):
    """ELoRA / VeRA: h = W0 x + b ⊙ (B (d ⊙ (A x))), i.e. ΔW = diag(b) B diag(d) A.

    A (r, in) and B (out, r) are random (kaiming-uniform from a seeded CPU generator) and frozen;
    only the vectors d (r,) = d_init and b (out,) = 0 train. Unlike PEFT's VeRA, which shares one
    pair across layers, each module draws its own pair (as the AFLoRA code's ELoRA does).
    r may exceed in_features: the matrices are just wide.

    Two exact ways to compute the same output (`path`, also settable later as `layer.path`):
      "token"   every token goes through A and B: b ⊙ (B (d ⊙ (A x))), as PEFT's VeRA does
      "weight"  form ΔW = delta_weight() once per forward and do one matmul with W0 + ΔW; autograd
                gives the gradients of d and b through ΔW. On a low-precision base, or under
                autocast, a small ΔW would be rounded away inside W0, so there the adapter's
                contribution x ΔWᵀ is added to base(x) separately (in fp32 on a fp16/bf16 base).
      "auto"    (default) whichever costs fewer multiply-adds for this input (see choose_path).
    """

    PATHS = ("auto", "token", "weight")

    def __init__(self, base_layer: nn.Linear, r: int = 1024, d_init: float = 0.1, seed: int = 0,
                 trainable_projections: bool = False, path: str = "auto"):
        super().__init__(base_layer, r)
        if not _is_int(seed) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2**63) (it is saved as int64), got {seed!r}; "
                             "add_adapters derives one per layer from any integer run seed (layer_seed)")
        self.path = path
        g = torch.Generator().manual_seed(int(seed))
        self.seed = int(seed)
        self.lora_A = self._param(_kaiming_uniform((r, self.in_features), self.in_features, g),
                                  trainable_projections)               # (r, in)
        self.lora_B = self._param(_kaiming_uniform((self.out_features, r), r, g),
                                  trainable_projections)               # (out, r)
        self.lora_d = self._param(torch.full((r,), float(d_init)))     # (r,)
        self.lora_b = self._param(torch.zeros(self.out_features))      # (out,)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = diag(b) B diag(d) A,  (out, in)."""
        return (self.lora_b[:, None] * self.lora_B) @ (self.lora_d[:, None] * self.lora_A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.lora_A.T) * self.lora_d) @ self.lora_B.T * self.lora_b  # (..., out)

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in self.PATHS:
            raise ValueError(f"path must be one of {self.PATHS}, got {value!r}")
        self._path = value

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether the weight path may fold ΔW into W0 (fp32 base and adapters, no autocast)."""
        return self.base_layer.weight.dtype == torch.float32 and self.lora_A.dtype == torch.float32 \
            and not torch.is_autocast_enabled(x.device.type)

    def choose_path(self, x: torch.Tensor) -> str:
        """The path a forward on x takes. "auto" compares the extra multiply-adds of forward +
        backward over the frozen layer's own work, for n = x.numel() / in tokens:

            token   2 n r (in + out)              (A x and B h, then their two input gradients)
            weight  3 out r in + c n in out       (form ΔW, its two factor gradients, the ΔW
                                                   gradient gyᵀ x; c = 1 fused into W0, else 3)

        and takes the cheaper; the token path while A or B still train (AFLoRA's adaptive phase),
        whose gradients the weight path would form as full out x in products."""
        if self.path != "auto":
            return self.path
        if self.lora_A.requires_grad or self.lora_B.requires_grad:
            return "token"
        n, i, o, r = x.numel() // self.in_features, self.in_features, self.out_features, self.r
        token = 2 * n * r * (i + o)
        weight = 3 * o * r * i + (1 if self._fused(x) else 3) * n * i * o
        return "weight" if weight < token else "token"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        if self.merged or self.disabled or self.choose_path(x) == "token":
            return super().forward(x)
        if self._fused(x):                                       # one matmul with W0 + ΔW
            return nn.functional.linear(x, self.base_weight() + self.delta_weight(), self.base_layer.bias)
        y = self.base_layer(x)                                   # keep ΔW out of a low-precision W0
        delta = self.delta_weight()
        return y + nn.functional.linear(x.to(delta.dtype), delta).to(y.dtype)


class AFLoRALinear(ELoRALinear):
    """AFLoRA: the ELoRA update at small rank, with A and B trainable until the freezer freezes them.

    adaptive=None is the released code's policy: A, B are trainable (and later frozen by the score)
    only where in_features != out_features (the FFN matrices); square matrices (attention) keep
    frozen random A, B from step 0. adaptive=True/False forces the choice.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 4, adaptive: bool | None = None,
                 d_init: float = 0.1, seed: int = 0, path: str = "auto"):
        if adaptive is None and _adaptable(base_layer):
            adaptive = base_layer.weight.shape[0] != base_layer.weight.shape[1]   # not square
        super().__init__(base_layer, r, d_init=d_init, seed=seed,
                         trainable_projections=bool(adaptive), path=path)
        self.adaptive = bool(adaptive)


# ----------------------------------------------------------------------------------------------
# Injection into any torch model

_METHODS = {"lora": LoRALinear, "elora": ELoRALinear, "aflora": AFLoRALinear}
_DEFAULT_R = {"lora": 8, "elora": 1024, "aflora": 4}


def adapter_layers(model: nn.Module):
    """Yield (name, layer) for every adapter layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, _AdapterLinear):
            yield name, module


def layer_seed(seed: int, name: str) -> int:
    """The projection seed of layer `name` in a run seeded `seed`: 63 bits of SHA-256("seed:name").

    A plain seed + i would make run s+1's layer i draw the same A, B as run s's layer i+1, so runs
    with "different" seeds would share most of their projections. Stable across processes and
    machines (not Python's salted hash())."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def add_adapters(model: nn.Module, method: str, targets, r: int | None = None,
                 train=("classifier",), seed: int = 0, **options) -> nn.Module:
    """Wrap every nn.Linear whose dotted name equals a target or ends with "." + target.

    Freezes every other parameter except those whose name contains an entry of `train`.
    `options` go to the layer class (alpha, dropout for LoRA; d_init, adaptive, path for ELoRA/AFLoRA).
    ELoRA/AFLoRA: each layer draws its random A, B from `layer_seed(seed, name)`, a hash of the run's
    seed and the layer's dotted name, so no two (seed, layer) pairs share a projection. Returns the model.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(_METHODS)}")
    r = _DEFAULT_R[method] if r is None else r
    if not _is_int(r) or r <= 0:
        raise ValueError(f"rank r must be a positive integer, got {r!r}")
    r = int(r)
    targets = [targets] if isinstance(targets, str) else list(targets)
    train = [] if train is None else [train] if isinstance(train, str) else list(train)
    if not targets:
        raise ValueError("targets is empty; name the nn.Linear modules to adapt, e.g. ['query', 'value']")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if any(True for _ in adapter_layers(model)):
        raise ValueError("this model already has adapters; adapters cannot be added twice "
                         "(start from a fresh model, or unmerge and keep the existing ones)")
    chosen = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    if not chosen:
        linears = [n for n, m in model.named_modules() if _adaptable(m)]
        raise ValueError(f"no module matches targets {targets}; nn.Linear modules in this model: {linears}")
    bad = [f"{n} ({type(m).__name__})" for n, m in chosen if not _adaptable(m)]
    if bad:
        raise ValueError(f"targets must name nn.Linear modules, but these matched: {bad}; "
                         "use a more specific target such as 'attention.output.dense'")
    inside_mha = [n for n, _ in chosen
                  if isinstance(model.get_submodule(n.rpartition(".")[0]), nn.MultiheadAttention)]
    if inside_mha:
        raise ValueError(f"{inside_mha} belong to an nn.MultiheadAttention, which reads their weight directly "
                         "(an adapter there would be bypassed or fail); adapt the other nn.Linear modules "
                         "(e.g. linear1, linear2 of nn.TransformerEncoderLayer)")
    with torch.random.fork_rng(devices=[]):  # a bad option (typo, range) fails here, model untouched
        _METHODS[method](nn.Linear(2, 2), r=r, **options)
    for p in model.parameters():
        p.requires_grad_(False)
    cls = _METHODS[method]
    for name, linear in chosen:
        if method == "lora":
            layer = cls(linear, r=r, **options)
        else:
            layer = cls(linear, r=r, seed=layer_seed(seed, name), **options)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    unmatched = [t for t in train if not any(t in n for n, _ in model.named_parameters())]
    if unmatched:
        warnings.warn(f"train entries {unmatched} match no parameter; nothing extra is trained for them",
                      stacklevel=2)
    for n, p in model.named_parameters():
        if any(t in n for t in train) and ".lora_" not in n and "base_layer" not in n:
            p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------------
# AFLoRA: the cubic schedule and the freezing score


def cubic_schedule(step: int, total_steps: int, t_init: int, t_final: int) -> float:
    """ρ(t): the fraction of adaptive projection matrices still trainable (AFLoRA eq. 4).

        ρ(t) = 1                                      t <= t_i
        ρ(t) = (1 - (t - t_i) / (T - t_i - t_f))^3    t_i < t <= T - t_f
        ρ(t) = 0                                      t > T - t_f
    """
    for label, v in (("step", step), ("total_steps", total_steps), ("t_init", t_init), ("t_final", t_final)):
        if not _is_int(v):
            raise TypeError(f"{label} must be an integer number of optimizer steps, got {v!r} "
                            f"(the optimizer steps the run takes, e.g. epochs * math.ceil(len(train_loader) / grad_accumulation) "
                            f"as a Hugging Face Trainer counts them)")
    if t_init < 0 or t_final < 0 or t_init + t_final >= total_steps:
        raise ValueError(f"need 0 <= t_init, 0 <= t_final and t_init + t_final < total_steps, got "
                         f"t_init={t_init}, t_final={t_final}, total_steps={total_steps}")
    if step <= t_init:
        return 1.0
    if step > total_steps - t_final:
        return 0.0
    return (1.0 - (step - t_init) / (total_steps - t_init - t_final)) ** 3


class AFLoRAFreezer:
    """Scores every still-trainable AFLoRA A and B and freezes them on the cubic schedule.

    Call `step()` once per optimizer step, after `loss.backward()` (and gradient clipping, if any)
    and before `optimizer.step()`; under a Hugging Face Trainer, `trainer_callback(freezer)` does it.
    A warning comes after `forget_warning_after` training forwards with no step(): raise it above the
    number of micro-batches per optimizer step if you accumulate gradients over more than 100.
    Per matrix θ:
      every step      accumulate |∇θ L| into the window mean I (window ΔT steps)
      every ΔT steps  Ī <- β1 Ī + (1-β1) I                 (smoothed sensitivity, eq. 5)
                      Ū <- β2 Ū + (1-β2) |I - Ī|           (uncertainty, eq. 6, with the new Ī)
                      s = Ī ⊙ Ū, score(θ) = mean(s)          (freezing score, eq. 7)
    Rule (rule="quantile", the released code's, default): every ΔT steps take the k-th smallest
    ELEMENT score q of all still-trainable matrices, k = int(N (1-ρ)) of their N elements (rounded
    down, as released; k = 0 freezes nothing, where the released code would crash), and freeze each
    matrix whose mean score is below q. rule="rank": freeze the lowest-scoring matrices until the
    frozen fraction reaches 1-ρ. Either way everything left is frozen at the first step where ρ = 0,
    which is t = T - t_f (ρ(T - t_f) = 0), even if that step's window had a non-finite gradient.

    Two small differences from the released code, both deliberate: (1) t counts steps taken (the
    first step() is t = 1), the released loop counts from 0, so our freeze-all lands one optimizer
    step earlier; (2) a matrix frozen at step t does not take step t's update (its .grad and Adam
    state are dropped before optimizer.step()), where the released code lets it take that one more
    update. Freezing sets requires_grad=False, drops .grad and, if `optimizer` is given, its state.
    """

    def __init__(self, model: nn.Module, total_steps: int, t_init: int, t_final: int,
                 beta1: float = 0.85, beta2: float = 0.95, window: int = 10,
                 rule: str = "quantile", optimizer: torch.optim.Optimizer | None = None,
                 forget_warning_after: int = 100):
        cubic_schedule(0, total_steps, t_init, t_final)  # validates the schedule arguments
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{label} must be in [0, 1), got {beta}")
        if not _is_int(window) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if rule not in ("quantile", "rank"):
            raise ValueError(f"rule must be 'quantile' or 'rank', got {rule!r}")
        self.params = {f"{n}.{k}": getattr(m, k) for n, m in adapter_layers(model)
                       if isinstance(m, AFLoRALinear) and m.adaptive for k in ("lora_A", "lora_B")}
        if not self.params:
            raise ValueError("the model has no adaptive AFLoRA layer to freeze; call "
                             "add_adapters(model, 'aflora', targets) first, with targets that "
                             "include a non-square nn.Linear (or pass adaptive=True)")
        self.total_steps, self.t_init, self.t_final = total_steps, t_init, t_final
        self.beta1, self.beta2, self.window, self.rule = beta1, beta2, int(window), rule
        self._optimizer = None
        self.optimizer = optimizer                  # checked: see the setter
        self._last_grads: list | None = None        # (grad, version) of the last step: catches a 2nd call
        self.step_count = 0
        self.frozen_at: dict[str, int] = {}
        self.ipt_sum = {n: torch.zeros_like(p) for n, p in self.params.items()}   # Σ|∇| in window
        self.ipt_n = 0                                                             # steps in window
        self.exp_avg_ipt = {n: torch.zeros_like(p) for n, p in self.params.items()}  # Ī
        self.exp_avg_unc = {n: torch.zeros_like(p) for n, p in self.params.items()}  # Ū
        self.score_history: dict[str, list[tuple[int, float]]] = {n: [] for n in self.params}
        self.history: list[tuple[int, int]] = [(0, self.trainable_adapter_params(model))]
        self._model = model
        self._forwards_since_step = 0
        self._warned = set()
        self._forget_after = forget_warning_after
        self._hook = model.register_forward_pre_hook(self._count_forward)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose state of a matrix is dropped when it freezes (None: no state dropped)."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer) -> None:
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not any(id(p) in held for p in self.params.values()):
                raise ValueError("the optimizer holds none of the adaptive AFLoRA matrices (lora_A / lora_B), "
                                 "so freezing could never release their state: build the optimizer over "
                                 "the model's trainable parameters after add_adapters, or pass optimizer=None")
        self._optimizer = optimizer

    # -- the score ---------------------------------------------------------------------------
    def _count_forward(self, module, args):
        if module.training:
            self._forwards_since_step += 1
            if self._forwards_since_step == self._forget_after and "forgot" not in self._warned:
                self._warned.add("forgot")
                warnings.warn(f"{self._forget_after} training forwards without AFLoRAFreezer.step(); "
                              "call freezer.step() after loss.backward() or nothing is ever frozen (with "
                              "gradient accumulation over more micro-batches than that, raise "
                              "forget_warning_after)",
                              stacklevel=2)

    def active(self) -> list[str]:
        """Names of the adaptive matrices not yet frozen."""
        return [n for n in self.params if n not in self.frozen_at]

    @torch.no_grad()
    def accumulate(self, names: list[str]) -> None:
        """Add |∇θ L| of each named matrix to its window sum (two fused kernels, no GPU sync)."""
        grads = []
        for n in names:
            g = self.params[n].grad
            if g is None and not self.params[n].requires_grad:
                raise ValueError(f"AFLoRAFreezer.step(): {n} is frozen (requires_grad=False) but this freezer never "
                                 "froze it: restore the freezer's own state too (freezer.load_state_dict, or "
                                 "load_checkpoint(..., freezer=freezer)), or build the freezer on a model whose "
                                 "adaptive matrices all train")
            if g is None:
                raise ValueError(f"AFLoRAFreezer.step(): {n} has no gradient; call step() after "
                                 "loss.backward() and before optimizer.zero_grad()")
            if g.device != self.ipt_sum[n].device:     # the model moved (e.g. Trainer's .to(device))
                for buf in (self.ipt_sum, self.exp_avg_ipt, self.exp_avg_unc):
                    buf[n] = buf[n].to(g.device)
            grads.append(g)
        torch._foreach_add_([self.ipt_sum[n] for n in names], torch._foreach_abs(grads))
        self.ipt_n += 1

    @torch.no_grad()
    def update_scores(self, names: list[str]) -> dict[str, float] | None:
        """Close a window: update Ī and Ū from the window mean I; return each matrix's mean score.
        If a gradient in the window was NaN or inf, the window is dropped and None is returned:
        no score or freeze decision is taken on it (one GPU sync per window, not per step)."""
        sums = [self.ipt_sum[n] for n in names]
        finite = bool(torch.stack([torch.isfinite(t).all() for t in sums]).all())
        if finite:
            for n, total in zip(names, sums):
                ipt = total / self.ipt_n                                                   # I
                self.exp_avg_ipt[n].mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)       # Ī
                self.exp_avg_unc[n].mul_(self.beta2).add_((ipt - self.exp_avg_ipt[n]).abs(),
                                                          alpha=1 - self.beta2)            # Ū
            means = torch.stack([self.element_scores(n).mean() for n in names]).tolist()
        else:
            warnings.warn(f"non-finite gradient in the window ending at step {self.step_count}; "
                          "the freezer dropped that window (if you use GradScaler, call "
                          "scaler.unscale_(optimizer) before freezer.step())", stacklevel=3)
        torch._foreach_zero_(sums)
        self.ipt_n = 0
        if not finite:
            return None
        for n, m in zip(names, means):
            self.score_history[n].append((self.step_count, m))
        return dict(zip(names, means))

    def element_scores(self, name: str) -> torch.Tensor:
        """s = Ī ⊙ Ū, element-wise, for one matrix."""
        return self.exp_avg_ipt[name] * self.exp_avg_unc[name]

    # -- the rule ------------------------------------------------------------------------------
    def to_freeze(self, names: list[str], scores: dict[str, float], rho: float) -> list[str]:
        """Which of the still-trainable `names` to freeze now, given their mean scores and ρ(t)."""
        if rho <= 0.0:
            return list(names)
        if self.rule == "quantile":
            elems = torch.cat([self.element_scores(n).flatten() for n in names]).float()  # (N,)
            k = int(elems.numel() * (1.0 - rho))           # the released code's count, rounded down
            if k < 1:
                return []
            q = elems.kthvalue(k).values.item()            # the (1-ρ) quantile of the element scores
            return [n for n in names if scores[n] < q]
        n_frozen_target = math.ceil((1.0 - rho) * len(self.params) - 1e-9)
        n_new = max(0, n_frozen_target - len(self.frozen_at))
        return sorted(names, key=lambda n: scores[n])[:n_new]

    def freeze(self, name: str) -> None:
        """Stop training one matrix: requires_grad False, grad and optimizer state dropped."""
        p = self.params[name]
        p.requires_grad_(False)
        p.grad = None
        if self.optimizer is not None:
            self.optimizer.state.pop(p, None)
        self.frozen_at[name] = self.step_count

    def step(self) -> list[str]:
        """One training step: score, and freeze per the schedule. Returns the names frozen now."""
        self._forwards_since_step = 0
        if self.step_count >= self.total_steps:
            if "past" not in self._warned:
                self._warned.add("past")
                warnings.warn(f"AFLoRAFreezer.step() called past total_steps={self.total_steps}; "
                              "it does nothing (set total_steps to the real number of steps)",
                              stacklevel=2)
            return []
        names = self.active()
        if not names:                       # everything frozen: the final phase, nothing to do
            self.step_count += 1
            return []
        grads = [self.params[n].grad for n in names]
        if self._last_grads is not None and len(self._last_grads) == len(grads) and all(
                g is h and g._version == v for g, (h, v) in zip(grads, self._last_grads)):
            raise RuntimeError("AFLoRAFreezer.step() was called twice without a backward in between (the "
                               "gradients are the same, unchanged tensors): call it once per optimizer "
                               "step, after loss.backward(); nothing was changed")
        self.accumulate(names)
        self._last_grads = [(g, g._version) for g in grads]
        self.step_count += 1
        t = self.step_count
        rho = cubic_schedule(t, self.total_steps, self.t_init, self.t_final)
        new = []
        if t % self.window == 0 or rho == 0.0:
            scores = self.update_scores(names)
            if rho == 0.0:                  # t = T - t_f: everything left freezes, scores or not
                new = list(names)
            elif scores is not None and t > self.t_init:
                new = self.to_freeze(names, scores, rho)
            for n in new:
                self.freeze(n)
        if new:
            self.history.append((t, self.trainable_adapter_params(self._model)))
        return new

    # -- bookkeeping ---------------------------------------------------------------------------
    @staticmethod
    def trainable_adapter_params(model: nn.Module) -> int:
        """Trainable parameters inside adapter layers (the classifier and other extras excluded)."""
        return sum(p.numel() for _, m in adapter_layers(model) for p in m.parameters() if p.requires_grad)

    def time_averaged_trainable(self) -> float:
        """Trainable adapter parameters averaged over the steps taken so far (the paper's 0.14M*):
        (1/t) Σ_{s=1..t} n_s, where n_s counts what step s's optimizer update trains. A matrix frozen
        at step s takes no update at step s, so it counts up to step s-1 (as helpers.train's
        per-step counts, taken after each step)."""
        steps = max(self.step_count, 1)
        starts = [max(1, s) for s, _ in self.history] + [steps + 1]   # history: (first step, count)
        total = sum(count * (min(b, steps + 1) - min(a, steps + 1))
                    for (_, count), a, b in zip(self.history, starts, starts[1:]))
        return total / steps

    def state_dict(self) -> dict:
        """Everything needed to resume: counters, window sums, Ī, Ū, frozen_at, histories."""
        return {"step": self.step_count, "ipt_n": self.ipt_n, "frozen_at": dict(self.frozen_at),
                "ipt_sum": {n: t.clone() for n, t in self.ipt_sum.items()},
                "exp_avg_ipt": {n: t.clone() for n, t in self.exp_avg_ipt.items()},
                "exp_avg_unc": {n: t.clone() for n, t in self.exp_avg_unc.items()},
                "history": list(self.history),
                "score_history": {n: list(h) for n, h in self.score_history.items()}}

    def check_state_dict(self, state: dict) -> None:
        """Raise ValueError if a state_dict() does not fit this freezer's matrices (names, shapes)."""
        names = set(state.get("exp_avg_ipt", {}))
        if names != set(self.params) or not set(state.get("frozen_at", {})) <= names:
            raise ValueError(f"freezer state is for other matrices: missing {sorted(set(self.params) - names)}, "
                             f"unexpected {sorted(names - set(self.params))}; build the freezer on the same model")
        for key in ("ipt_sum", "exp_avg_ipt", "exp_avg_unc"):
            for n, t in state[key].items():
                if t.shape != self.params[n].shape:
                    raise ValueError(f"freezer state {key}[{n}] has shape {tuple(t.shape)}, "
                                     f"the model's is {tuple(self.params[n].shape)}")

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict() (checked first: a bad one changes nothing) and re-freeze every
        matrix that was frozen."""
        self.check_state_dict(state)
        for key in ("ipt_sum", "exp_avg_ipt", "exp_avg_unc"):
            for n, t in state[key].items():
                getattr(self, key)[n] = t.detach().clone().to(self.params[n].device)
        self.step_count, self.ipt_n = int(state["step"]), int(state["ipt_n"])
        self.history = [tuple(h) for h in state["history"]]
        self.score_history = {n: [tuple(h) for h in hs] for n, hs in state["score_history"].items()}
        self.frozen_at = {}
        for n, s in state["frozen_at"].items():
            self.freeze(n)
            self.frozen_at[n] = int(s)
        for n in self.active():
            self.params[n].requires_grad_(True)

    def remove(self) -> None:
        """Detach the forgot-to-call-step() hook from the model."""
        self._hook.remove()


# ----------------------------------------------------------------------------------------------
# Utilities: counting, merging, saving


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print `trainable params: X || all params: Y || trainable%: Z` (PEFT's format)."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")


def _require_adapters(model: nn.Module) -> list:
    layers = [m for _, m in adapter_layers(model)]
    if not layers:
        raise ValueError("the model has no adapter layers; call add_adapters(model, method, targets) first")
    return layers


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every ΔW into its base weight (never automatic, e.g. not on eval()). Idempotent."""
    for layer in _require_adapters(model):
        if not layer.merged:
            layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo merge_adapters. Idempotent."""
    for layer in _require_adapters(model):
        if layer.merged:
            layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by its own base layer holding W0 + ΔW (computed in fp32, stored in
    the base's dtype): a plain model with no trace of the adapters and no inference overhead, whose
    `save_pretrained` / `from_pretrained` round trip holds. Returns the model. (A model that still
    holds adapter layers saves keys such as `...query.base_layer.weight`, which `from_pretrained`
    does not find: it would load random weights there.)"""
    inner = _unwrap(model)
    _require_adapters(inner)
    for name, layer in list(adapter_layers(inner)):
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent_name) if parent_name else inner, child, layer.base_layer)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside this block the model computes the base model's output (adapters skipped)."""
    layers = _require_adapters(model)
    if any(layer.merged for layer in layers):
        raise ValueError("cannot disable merged adapters; call unmerge_adapters(model) first")
    before = [layer.disabled for layer in layers]      # nested blocks restore the outer one's state
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


@torch.no_grad()
def projection_fingerprint(layer: ELoRALinear) -> torch.Tensor:
    """A small float64 summary of a layer's random A and B (sums, sums of squares, two elements),
    computed on the CPU: two different draws differ in it at O(1), the same draw agrees to ~1e-15."""
    A, B = layer.lora_A.detach().double().cpu(), layer.lora_B.detach().double().cpu()
    return torch.stack([A.sum(), A.square().sum(), B.sum(), B.square().sum(), A.flatten()[0], B.flatten()[-1]])


def adapter_state_dict(model: nn.Module, save_projections: bool = False) -> dict[str, torch.Tensor]:
    """Adapter tensors, trained extras (e.g. the classifier) and AFLoRA frozen flags; no base weights.

    ELoRA's frozen random A, B are not saved by default: they are regenerated from their seed, saved
    as `<layer>.seed`, and a fingerprint of them, `<layer>.fingerprint`, is saved and checked on load
    (a torch release that drew other numbers from the same seed would otherwise load silently wrong
    projections). save_projections=True saves A and B themselves (larger; loads on any torch).
    A flat {name: tensor} dict (safetensors-ready).
    """
    layer_names = dict(adapter_layers(model))
    state = {}
    for name, layer in layer_names.items():
        for k, p in layer.named_parameters(recurse=False):
            if type(layer) is ELoRALinear and k in ("lora_A", "lora_B") and not p.requires_grad \
                    and not save_projections:
                continue
            state[f"{name}.{k}"] = p.detach().clone()
        if isinstance(layer, ELoRALinear):
            state[f"{name}.seed"] = torch.tensor(layer.seed)
            state[f"{name}.fingerprint"] = projection_fingerprint(layer)
        if isinstance(layer, AFLoRALinear) and layer.adaptive:
            for k in ("lora_A", "lora_B"):
                state[f"{name}.{k}.frozen"] = torch.tensor(not getattr(layer, k).requires_grad)
    for n, p in model.named_parameters():
        if p.requires_grad and ".lora_" not in n:
            state[n] = p.detach().clone()
    return state


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load adapter_state_dict() output into a model with the same adapters. Checks every key
    and shape before copying anything, so a bad state leaves the model untouched."""
    layers = _require_adapters(model)
    if any(layer.merged for layer in layers):
        raise ValueError("cannot load adapter weights into a merged model; call unmerge_adapters(model) first")
    params = dict(model.named_parameters())
    layer_names = dict(adapter_layers(model))
    problems = []
    for key, value in state.items():
        if key.endswith(".frozen"):
            if key[: -len(".frozen")] not in params:
                problems.append(f"{key}: no such AFLoRA matrix")
        elif key.endswith(".fingerprint") and key[: -len(".fingerprint")] in layer_names:
            layer = layer_names[key[: -len(".fingerprint")]]
            saved_in_file = all(f"{key[: -len('.fingerprint')]}.{k}" in state for k in ("lora_A", "lora_B"))
            if not saved_in_file and not torch.allclose(projection_fingerprint(layer), value.double(),
                                                        rtol=1e-9, atol=1e-12):
                problems.append(f"{key}: the random projections regenerated from seed {layer.seed} are not "
                                f"the ones this adapter was trained with (torch {torch.__version__} draws "
                                "other numbers from that seed); load it with the torch release that saved "
                                "it and re-save with adapter_state_dict(model, save_projections=True)")
        elif key.endswith(".seed") and key[: -len(".seed")] in layer_names:
            seed = layer_names[key[: -len(".seed")]].seed
            if int(value) != seed:
                problems.append(f"{key}: saved with projection seed {int(value)}, the model has {seed} "
                                f"(call add_adapters with the same seed)")
        elif key not in params:
            problems.append(f"{key}: unexpected (not in this model)")
        elif tuple(value.shape) != tuple(params[key].shape):
            problems.append(f"{key}: shape {tuple(value.shape)} does not fit {tuple(params[key].shape)}")
    meta = (".frozen", ".seed", ".fingerprint")
    expected = {k for k in adapter_state_dict(model) if not k.endswith(meta)}
    problems += [f"{k}: missing from the state" for k in sorted(expected - set(state))]
    if problems:
        raise ValueError("adapter state does not fit this model (same method, r, targets and seed?):\n  "
                         + "\n  ".join(problems))
    for key, value in state.items():
        if key.endswith(".frozen"):
            params[key[: -len(".frozen")]].requires_grad_(not bool(value))
        elif not key.endswith(meta) or key.rpartition(".")[0] not in layer_names:
            params[key].copy_(value)
    return model


# ----------------------------------------------------------------------------------------------
# Export and distributed training: a standard PEFT LoRA adapter, exact resume, DDP

_CHECKPOINT_FORMAT = "aflora_min.checkpoint.v1"


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper (else the model itself)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


@torch.no_grad()
def lora_factors(layer: _AdapterLinear) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A', B', alpha') with (alpha' / r') · B' A' == layer.delta_weight(), r' = A'.shape[0].

    LoRA: A, B and alpha as they are. ELoRA/AFLoRA: A' = diag(d) A, B' = diag(b) B, alpha' = r'
    (scaling 1). Where r > min(in, out) these factors would be wider than ΔW itself, so the exact
    lower-rank factorisation is returned instead: A' = I, B' = ΔW if in <= out, else A' = ΔW, B' = I
    (rank min(in, out), scaling 1, no SVD and no rounding beyond computing ΔW in fp32).
    """
    if layer.r > min(layer.in_features, layer.out_features):
        delta = layer.delta_weight()                                         # (out, in)
        eye = torch.eye(min(delta.shape), device=delta.device)
        A, B = (eye, delta) if layer.in_features <= layer.out_features else (delta, eye)
        return A, B, float(A.shape[0])
    if isinstance(layer, LoRALinear):
        return layer.lora_A.detach(), layer.lora_B.detach(), layer.alpha
    return layer.lora_d[:, None] * layer.lora_A, layer.lora_b[:, None] * layer.lora_B, float(layer.r)


def _trained_extras(model: nn.Module) -> list[str]:
    """The submodules to export whole (PEFT's modules_to_save) so that every trained non-adapter
    parameter is included: its owner, or the highest ancestor whose parameters all train
    (RoBERTa's classifier.dense and classifier.out_proj give ["classifier"])."""
    layer_names = [n for n, _ in adapter_layers(model)]
    trained = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}

    def adapter_free(module: str) -> bool:
        return bool(module) and not any(ln == module or ln.startswith(module + ".") for ln in layer_names)

    def all_trained(module: str) -> bool:
        return adapter_free(module) and all(f"{module}.{k}" in trained
                                            for k, _ in model.get_submodule(module).named_parameters())
    extras = []
    for n, _ in model.named_parameters():
        if n not in trained:
            continue
        module = n.rpartition(".")[0]
        if not adapter_free(module):
            raise ValueError(f"trained parameter {n!r} is not inside a submodule free of adapters, so it "
                             "cannot be exported as a PEFT module to save; train a leaf module instead")
        while all_trained(module.rpartition(".")[0]):
            module = module.rpartition(".")[0]
        if module not in extras:
            extras.append(module)
    return extras


def export_lora(model: nn.Module, directory, task_type: str | None = "auto",
                base_model_name_or_path: str | None = None) -> dict:
    """Write the adapters as a standard PEFT LoRA adapter that `PeftModel.from_pretrained(base, directory)`
    loads on a fresh copy of the base model: adapter_config.json and adapter_model.safetensors.

    Every adapter layer becomes one LoRA pair (see lora_factors); per-module ranks and alphas that
    differ from the most common pair go to rank_pattern / alpha_pattern; trained extras (the
    classifier) become modules_to_save. task_type "auto" means "SEQ_CLS" for a
    *ForSequenceClassification model, else None. Returns the config written.
    """
    import json
    import os
    import re
    from collections import Counter
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise ImportError("export_lora needs the safetensors package: pip install safetensors") from e
    model = _unwrap(model)
    if any(layer.merged for layer in _require_adapters(model)):
        raise ValueError("the model is merged: its base weights already hold ΔW, and the exported "
                         "adapter would add it a second time; call unmerge_adapters(model) first")
    conv = {layer.fan_in_fan_out for _, layer in adapter_layers(model)}
    if len(conv) > 1:
        raise ValueError("the adapters wrap both nn.Linear and Conv1D layers; a PEFT LoRA config has one "
                         "fan_in_fan_out for all of them: export the two kinds from separate models")
    tensors, pairs = {}, {}
    for name, layer in adapter_layers(model):
        A, B, alpha = lora_factors(layer)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.float().cpu().contiguous()
        pairs[name] = (A.shape[0], int(alpha) if float(alpha).is_integer() else alpha)
    extras = _trained_extras(model)
    for module in extras:
        for k, v in model.get_submodule(module).state_dict().items():
            tensors[f"base_model.model.{module}.{k}"] = v.detach().cpu().contiguous()
    (r, alpha), _ = Counter(pairs.values()).most_common(1)[0]
    if task_type == "auto":
        task_type = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else None
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "target_modules": list(pairs),
        "rank_pattern": {re.escape(n): p[0] for n, p in pairs.items() if p[0] != r},
        "alpha_pattern": {re.escape(n): p[1] for n, p in pairs.items() if p[1] != alpha},
        "modules_to_save": extras or None, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": conv == {True}, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True,
    }
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    return config


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rng_state() -> dict:
    """torch CPU, current CUDA device, python `random` and (if imported) numpy's global RNG, as
    tensors and numbers that torch.load(weights_only=True) accepts."""
    import random
    import sys
    version, mt, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(mt, dtype=torch.int64),
             "python_version": version, "python_gauss": gauss}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    np = sys.modules.get("numpy")
    if np is not None:
        _, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    return state


def _set_rng_state(state: dict) -> None:
    import random
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np
        s = state["numpy"]
        keys = s["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, s["pos"], s["has_gauss"], s["cached"]))


def save_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None, freezer=None, **extra) -> None:
    """Save what an exact resume needs to one file: adapter_state_dict(model), the optimizer,
    scheduler and freezer state_dicts, this process's RNG states and rank, and `extra` (e.g. step=t).

    The file is checked to load with torch.load(weights_only=True) before it is written, so `extra`
    may hold tensors, numbers, strings, lists and dicts, never arbitrary objects. Under DDP every
    rank saves its own file: the adapters are the same on every rank, the RNG states are not.
    """
    import io
    rank, world = _rank_and_world()
    state = {"format": _CHECKPOINT_FORMAT, "adapter": adapter_state_dict(_unwrap(model)),
             "rng": _rng_state(), "rank": rank, "world_size": world, "extra": dict(extra)}
    for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("freezer", freezer)):
        if obj is not None:
            state[key] = obj.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as e:
        raise TypeError("this checkpoint could not be loaded back with torch.load(weights_only=True); "
                        "keep extra= and the scheduler's state to tensors, numbers, strings, lists and "
                        f"dicts: {e}") from None
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def _check_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved_sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != saved_sizes:
        raise ValueError(f"the optimizer state is for parameter groups of sizes {saved_sizes}, this optimizer "
                         f"has {sizes}; build the optimizer as in the original run, on the freshly built "
                         "model (frozen matrices included) and before load_checkpoint")
    params = {i: p for sg, g in zip(saved["param_groups"], optimizer.param_groups)
              for i, p in zip(sg["params"], g["params"])}
    for i, st in saved["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape != params[i].shape:
                raise ValueError(f"optimizer state {k!r} of parameter {i} has shape {tuple(v.shape)}, "
                                 f"the parameter's is {tuple(params[i].shape)}")


def load_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None, freezer=None) -> dict:
    """Resume from save_checkpoint(): build the model (add_adapters), optimizer, scheduler and freezer
    exactly as for a fresh run, then call this. Returns the `extra` dict that was saved.

    Reads with torch.load(weights_only=True): tensors and plain containers, never arbitrary pickled
    objects. Everything is checked before anything changes. The RNG states are restored only if the
    file was saved by this rank of the same world size (otherwise a warning says they were not).
    Under DDP, load into the inner model before wrapping it, or re-wrap after loading
    (`ddp = rewrap_ddp(ddp)`): matrices the checkpoint froze stop requiring grad, and the old
    wrapper's reducer still waits for their gradients (a warning says so).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an aflora_min checkpoint; write one with save_checkpoint()")
    for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("freezer", freezer)):
        if obj is not None and key not in state:
            raise ValueError(f"the checkpoint holds no {key} state (it was saved without one); pass {key}=None")
    if optimizer is not None:
        _check_optimizer_state(optimizer, state["optimizer"])
    if freezer is not None:
        freezer.check_state_dict(state["freezer"])
    trains = [p for p in _unwrap(model).parameters() if p.requires_grad]
    load_adapter_state_dict(_unwrap(model), state["adapter"])       # checks, then copies
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if freezer is not None:
        freezer.load_state_dict(state["freezer"])
    if isinstance(model, nn.parallel.DistributedDataParallel) and any(not p.requires_grad for p in trains):
        warnings.warn("the checkpoint froze matrices that required grad when this model was wrapped in "
                      "DistributedDataParallel: re-wrap it now (ddp = am.rewrap_ddp(ddp, ...)), or load into "
                      "the inner model before wrapping", stacklevel=2)
    if (state["rank"], state["world_size"]) == _rank_and_world():
        _set_rng_state(state["rng"])
    else:
        rank, world = _rank_and_world()
        warnings.warn(f"checkpoint saved by rank {state['rank']} of {state['world_size']}, loaded by rank "
                      f"{rank} of {world}: adapters and optimizer restored, RNG states NOT restored (the "
                      "resume is not bit-exact); let each rank save and load its own file", stacklevel=2)
    return state["extra"]


def rewrap_ddp(ddp_model: nn.Module, **ddp_kwargs) -> nn.Module:
    """A new DistributedDataParallel around `ddp_model.module`, built for the parameters that require
    grad now. Call it after every freezer.step() that froze something, before the next forward:

        if freezer.step():                      # same matrices, same step, on every rank
            model = rewrap_ddp(model, device_ids=[local_rank])

    Why: DDP's reducer is built for the parameters that required grad at wrap time. Once a matrix
    is frozen, the default wrapper (find_unused_parameters=False) never sees its gradient: the next
    step silently skips the all-reduce of that gradient bucket (the ranks diverge), and the step
    after raises "Expected to have finished reduction in the prior iteration". The alternative is
    DDP(model, find_unused_parameters=True) from the start, which costs a graph traversal every step.
    Every rank freezes the same matrices because the scores come from the all-reduced gradients;
    this is checked (one small all_gather), as ranks that disagree would hang in the next backward.
    Pass the keyword arguments of the original wrap; init_sync=False (nothing is broadcast, the
    weights already agree on every rank) unless you pass it.
    """
    import inspect
    from torch.nn.parallel import DistributedDataParallel
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"rewrap_ddp expects a DistributedDataParallel model, got {type(ddp_model).__name__}")
    group = ddp_model.process_group
    flags = [p.requires_grad for p in ddp_model.module.parameters()]
    everyone = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(everyone, flags, group=group)
    if any(f != flags for f in everyone):
        raise RuntimeError("the ranks disagree on which parameters require grad (different freeze "
                           "decisions?); every rank must run the same freezer on the all-reduced gradients")
    if "init_sync" in inspect.signature(DistributedDataParallel).parameters:   # torch >= 2.4
        ddp_kwargs.setdefault("init_sync", False)
    return DistributedDataParallel(ddp_model.module, **ddp_kwargs)


def trainer_callback(freezer: AFLoRAFreezer):
    """A `transformers.TrainerCallback` that runs AFLoRA's freezer inside a Hugging Face Trainer:

        trainer = Trainer(model, args, ..., callbacks=[am.trainer_callback(freezer)])

    - `freezer.step()` runs once per optimizer step, after the gradients of all micro-batches are
      accumulated and clipped (the on_pre_optimizer_step hook, transformers >= 4.45), so total_steps
      counts optimizer steps, as Trainer's max_steps does; it must equal the Trainer's max_steps.
      (helpers.train in the notebooks runs it at the same point: after clipping, before the step.)
    - The freezer's state is saved into every checkpoint folder (aflora_freezer.pt) and restored when
      training resumes from one, after Trainer has rebuilt and reloaded its optimizer. If the freezer
      has no optimizer, the Trainer's is attached, so frozen matrices release their Adam state.
    - Under DDP, Trainer wraps the model once, so frozen matrices need
      ddp_find_unused_parameters=True (Trainer's default for a model without gradient
      checkpointing); an explicit False, or gradient checkpointing with the default, is refused.
    transformers is imported here, not at the top: this file still needs only torch.
    """
    import os
    try:
        import transformers
        from transformers import TrainerCallback
    except ImportError as e:
        raise ImportError("trainer_callback needs transformers >= 4.45: pip install 'transformers>=4.45'") from e
    if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
        raise ImportError(f"trainer_callback needs transformers >= 4.45 (the on_pre_optimizer_step hook); this is "
                          f"transformers {transformers.__version__}: pip install -U 'transformers>=4.45'")
    file_name = "aflora_freezer.pt"

    class AFLoRACallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.max_steps != freezer.total_steps:
                raise ValueError(f"the freezer's total_steps={freezer.total_steps} but the Trainer will take "
                                 f"max_steps={state.max_steps} optimizer steps; build the freezer with "
                                 f"total_steps={state.max_steps} (or set TrainingArguments(max_steps=...))")
            if getattr(args, "world_size", 1) > 1:
                find_unused = args.ddp_find_unused_parameters
                if find_unused is None:
                    find_unused = not getattr(model, "is_gradient_checkpointing", False)
                if not find_unused:
                    raise ValueError("under DDP, Trainer wraps the model once, and the matrices AFLoRA freezes "
                                     "stop getting gradients: set TrainingArguments(ddp_find_unused_parameters=True)")
            if optimizer is not None and freezer.optimizer is None:
                freezer.optimizer = optimizer
            if state.global_step > 0:           # resuming: Trainer has reloaded its optimizer by now
                path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", file_name)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"resuming at step {state.global_step}, but {path} does not exist; "
                                            "resume from a checkpoint written with this callback, in output_dir")
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if int(saved["step"]) != state.global_step:
                    raise ValueError(f"{path} holds the freezer at step {saved['step']}, the checkpoint is at "
                                     f"step {state.global_step}")
                freezer.load_state_dict(saved)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            freezer.step()

        def on_save(self, args, state, control, **kwargs):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder) and getattr(args, "process_index", 0) == 0:
                torch.save(freezer.state_dict(), os.path.join(folder, file_name))

    return AFLoRACallback()
