"""Builders for optimizer specs: plain data, identical in Python, in the proto and in checkpoints.

    optim.adam(1e-3)                       -> {"adam": {"learning_rate": 0.001}}
    optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(3e-4, weight_decay=0.01))
    optim.exponential_decay(1e-3, 1000, 0.1)   # usable wherever a number is
    optim.preset("flux:ADAM", learning_rate=0.01)

Names and hyperparameters are optax's. The server validates a spec when the model is created and
names the exact field at fault; `Client.rules()` lists every rule the server knows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Spec = Any  # JSON-compatible: dict, str, list, numbers, bools


def rule(name: str, **hyperparams: Any) -> dict:
    """Any rule, transform or schedule by name: rule("adam", learning_rate=1e-3)."""
    return {name: {k: v for k, v in hyperparams.items() if v is not None}}


def preset(name: str, **hyperparams: Any) -> dict:
    """A preset of another library with that library's defaults: preset("flux:ADAM")."""
    return rule(name, **hyperparams)


def chain(*specs: Spec) -> dict:
    """Applies the transforms in order (optax.chain)."""
    return {"chain": list(specs)}


def _builder(name: str, *positional: str) -> Callable[..., dict]:
    def build(*args: Any, **kwargs: Any) -> dict:
        if len(args) > len(positional):
            raise TypeError(f"{name}() takes at most {len(positional)} positional arguments")
        kwargs.update(zip(positional, args, strict=False))  # names past the last argument stay unset
        return rule(name, **kwargs)

    build.__name__ = name
    build.__doc__ = f"Spec for optax's `{name}`; positional arguments: {', '.join(positional) or 'none'}."
    return build


# One builder per rule, written out so that type checkers and editors see each name. The
# optimizers take their learning rate by position.
sgd = _builder("sgd", "learning_rate")
noisy_sgd = _builder("noisy_sgd", "learning_rate")
adam = _builder("adam", "learning_rate")
nadam = _builder("nadam", "learning_rate")
adamw = _builder("adamw", "learning_rate")
radam = _builder("radam", "learning_rate")
adamax = _builder("adamax", "learning_rate")
amsgrad = _builder("amsgrad", "learning_rate")
adagrad = _builder("adagrad", "learning_rate")
adadelta = _builder("adadelta", "learning_rate")
rmsprop = _builder("rmsprop", "learning_rate")
adabelief = _builder("adabelief", "learning_rate")
# lazy rules for embedding tables (docs/optimizers.md, "Row-sparse gradients (embedding tables)")
lazy_adam = _builder("lazy_adam", "learning_rate")
rowwise_adagrad = _builder("rowwise_adagrad", "learning_rate")
sparse_sgd = _builder("sparse_sgd", "learning_rate")
lamb = _builder("lamb", "learning_rate")
lars = _builder("lars", "learning_rate")
yogi = _builder("yogi", "learning_rate")

# Gradient transforms.
identity = _builder("identity")
scale = _builder("scale", "step_size")
scale_by_learning_rate = _builder("scale_by_learning_rate", "learning_rate")
scale_by_schedule = _builder("scale_by_schedule", "step_size_fn")
scale_by_adam = _builder("scale_by_adam")
scale_by_belief = _builder("scale_by_belief")
scale_by_radam = _builder("scale_by_radam")
scale_by_rms = _builder("scale_by_rms")
scale_by_rss = _builder("scale_by_rss")
scale_by_stddev = _builder("scale_by_stddev")
scale_by_trust_ratio = _builder("scale_by_trust_ratio")
scale_by_yogi = _builder("scale_by_yogi")
scale_by_amsgrad = _builder("scale_by_amsgrad")
scale_by_adamax = _builder("scale_by_adamax")
trace = _builder("trace", "decay")
add_decayed_weights = _builder("add_decayed_weights", "weight_decay")
add_noise = _builder("add_noise", "eta", "gamma", "seed")
centralize = _builder("centralize")
clip = _builder("clip", "max_delta")
clip_by_global_norm = _builder("clip_by_global_norm", "max_norm")
clip_by_leaf_norm = _builder("clip_by_leaf_norm", "max_norm")

# Schedules: usable wherever a number is.
constant_schedule = _builder("constant_schedule", "value")
exponential_decay = _builder("exponential_decay", "init_value", "transition_steps", "decay_rate")
inverse_time_decay = _builder("inverse_time_decay", "init_value", "decay_rate")
polynomial_schedule = _builder("polynomial_schedule", "init_value", "end_value", "power", "transition_steps")
linear_schedule = _builder("linear_schedule", "init_value", "end_value", "transition_steps")
cosine_decay_schedule = _builder("cosine_decay_schedule", "init_value", "decay_steps")
warmup_cosine_decay_schedule = _builder(
    "warmup_cosine_decay_schedule", "init_value", "peak_value", "warmup_steps", "decay_steps"
)
piecewise_constant_schedule = _builder("piecewise_constant_schedule", "init_value", "boundaries_and_scales")
join_schedules = _builder("join_schedules", "schedules", "boundaries")

__all__ = [
    "adabelief",
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "add_noise",
    "amsgrad",
    "centralize",
    "chain",
    "clip",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "identity",
    "inverse_time_decay",
    "join_schedules",
    "lamb",
    "lars",
    "linear_schedule",
    "nadam",
    "noisy_sgd",
    "piecewise_constant_schedule",
    "polynomial_schedule",
    "preset",
    "radam",
    "rmsprop",
    "rule",
    "scale",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_belief",
    "scale_by_learning_rate",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_schedule",
    "scale_by_stddev",
    "scale_by_trust_ratio",
    "scale_by_yogi",
    "sgd",
    "trace",
    "warmup_cosine_decay_schedule",
    "yogi",
]
