"""How much memory each device needs for the study's programs on a mesh, before renting one.

    python experiments/memory_plan.py --preset=paper --mesh=data:2,model:4 --device_memory_gib=80

compiles (never runs) every heavy program of the study for the preset's sizes and batches,
sharded over the mesh as the study shards it (`ipo_gap.sharding`: parameters by their logical
axes, batches over "data"), and prints per device what XLA's buffer assignment needs: the
arguments (parameters, optimizer state, batch), the outputs that do not reuse a donated
argument, and the temporaries. Nothing is allocated: models are abstract shapes.

On a host with the accelerators the numbers are that compiler's. On a CPU host,
`--simulate_devices=N` plans for N devices with XLA's CPU compiler: a GPU or TPU compiler
fuses and schedules differently, so read the numbers as an estimate (they show what dominates,
how a mesh or `--remat` changes it, and which programs cannot fit).

Programs, per policy size of the preset's scaling study and for both PMs: the SFT step, the
reference's log-probs of a training batch and the IPO step that takes them (as the loop runs
it: `steps.with_reference`), sampling a training batch and an evaluation batch, the exact KL
of an evaluation batch (sampling and both models' teacher-forced passes, App. D), the PM train
step (both orders of every pair), and a judgement of pairs at the study's batches
(`trainers.JUDGE_BATCH` for whole datasets; the evaluation batch). Prompts are at the preset's
full `prompt_len` (the study cuts them to the longest prompt present, so real runs need no
more).

Beside each program, the study (one process, as on accelerators) keeps other models on the
device: `beside` lists them by the study's order of stages (`Beside`) and adds their bytes
per device, and the verdict says whether the program fits with them ("fits"), only alone
("fits alone only") or not at all. A model's bytes are its parameters' shards on the mesh;
Adam's moments count as two more copies. Where a program runs in several contexts (a PM judges
during its own training and, at the evaluation batch, during every policy run), the largest
is taken. Models the study holds only for a moment (a saved checkpoint loaded to sample from,
Fig. 5) and arrays smaller than a model (batches, keys, metrics) are not counted.
"""

from __future__ import annotations

import os
import sys


def _simulated_devices(argv: list[str]) -> int | None:
    """--simulate_devices=N, read before jax is imported (XLA reads its flags once)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--simulate_devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--simulate_devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


if __name__ == "__main__" and _simulated_devices(sys.argv):
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_simulated_devices(sys.argv)}"
    )

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import dtype_flag  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from ipo_gap import kl, preference, sampling, sharding  # noqa: E402
from ipo_gap.study import PRESETS, StudyConfig  # noqa: E402
from ipo_gap.t5 import model as t5  # noqa: E402
from ipo_gap.train import steps, trainers  # noqa: E402

_PRESET = flags.DEFINE_enum("preset", "paper", list(PRESETS), "The study preset to plan.")
_MESH = flags.DEFINE_string(
    "mesh", "data:1", "The mesh, as reproduce.py's --mesh (e.g. data:2,model:4; -1 = the rest)."
)
_SIM = flags.DEFINE_integer(
    "simulate_devices",
    None,
    "Plan for this many simulated CPU devices (XLA's CPU compiler: an estimate of an "
    "accelerator's). Default: the host's own devices.",
)
_MEMORY = flags.DEFINE_float(
    "device_memory_gib",
    None,
    "Memory of one device in GiB; each program is marked whether it fits. Default: the "
    "device's own where it reports one (accelerators), else no verdict.",
)
_REMAT = flags.DEFINE_bool(
    "remat", None, "Override the preset's remat (T5Config.remat), as reproduce.py's --remat."
)
_SIZES = flags.DEFINE_list(
    "sizes",
    None,
    "Policy sizes to plan: the study's scaling sizes, as reproduce.py's --scaling_models "
    "(default: the preset's scaling_models). The preset's own policy size runs first either "
    "way, so its SFT policy is counted beside the others' programs.",
)
_JSON = flags.DEFINE_string("json", None, "Also write the rows as JSON lines to this file.")
_COMPUTE = dtype_flag.COMPUTE_DTYPE

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Plan:
    """One compiled program's per-device memory, in bytes (XLA's `memory_analysis`)."""

    program: str
    model: str
    batch: int
    arguments: int
    outputs: int  # outputs that do not reuse a donated argument's buffer
    temporaries: int
    compile_s: float
    beside: int = 0  # bytes per device of the models the study holds beside it (`Beside`)
    beside_of: str = ""  # what they are

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries

    @property
    def with_beside(self) -> int:
        return self.total + self.beside


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def abstract_model(cfg, mesh):
    """A T5 of `cfg` as shapes with the study's shardings (`sharding.model_shardings`)."""
    model = eqx.filter_eval_shape(t5.init, cfg, key=jax.random.key(0))
    params, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    shardings = eqx.filter(
        sharding.model_shardings(model, mesh), lambda x: isinstance(x, NamedSharding)
    )
    return eqx.combine(_abstract(params, shardings), static)


def abstract_opt_state(optimizer, model, mesh):
    """The optimizer state of `model` placed as the study places it: moments (subtrees shaped
    like the parameters) where the parameters are (eager `optimizer.init` on sharded
    parameters keeps their shardings), the rest (Adam's count) replicated
    (`sharding.place_like`)."""
    params = eqx.filter(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))  # as is_array
    like_params = jax.tree.structure(params)

    def place(sub):
        if jax.tree.structure(sub) == like_params:
            return jax.tree.map(
                lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding),
                sub,
                params,
            )
        return jax.tree.map(lambda x: replicated_like(x, mesh), sub)

    state = jax.eval_shape(optimizer.init, params)
    return jax.tree.map(place, state, is_leaf=lambda sub: jax.tree.structure(sub) == like_params)


def replicated_like(x, mesh):
    """`x`'s shape and dtype, replicated over `mesh` (keys, scalars, Adam's count)."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def abstract_key(mesh):
    return replicated_like(jax.eval_shape(lambda: jax.random.key(0)), mesh)


def batch_of(mesh, *shapes, dtype=jnp.int32):
    """Abstract token/mask arrays with their leading axis over "data", as `to_device` puts
    them."""
    return tuple(
        jax.ShapeDtypeStruct(s, dtype, sharding=sharding.batch_sharding(mesh, len(s)))
        for s in shapes
    )


def measure(program: str, model_name: str, batch: int, lowered) -> Plan:
    start = time.time()
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    return Plan(
        program,
        model_name,
        batch,
        arguments=m.argument_size_in_bytes,
        outputs=m.output_size_in_bytes - m.alias_size_in_bytes,
        temporaries=m.temp_size_in_bytes,
        compile_s=time.time() - start,
    )


def policy_programs(cfg: StudyConfig, model_cfg, mesh, name: str):
    """SFT step, IPO step, sampling (train and eval batches) and exact KL for one policy size."""
    S, T = cfg.prompt_len, cfg.target_len
    model = abstract_model(model_cfg, mesh)
    key = abstract_key(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    scalar = replicated_like(jax.ShapeDtypeStruct((), jnp.int32), mesh)

    sft_opt = trainers.adam_with_warmup(0.0, 0)
    B = cfg.sft_batch
    yield measure(
        "SFT step",
        name,
        B,
        trainers._sft_step().lower(
            model,
            abstract_opt_state(sft_opt, model, mesh),
            steps.SeqBatch(*batch_of(mesh, (B, S), (B, S), (B, T), (B, T))),
        ),
    )
    opt = steps.make_optimizer()
    B = cfg.rl_batch
    hp = _abstract(
        jax.eval_shape(lambda: steps.Hparams.make(1.0)), steps.Hparams(*[replicated] * 4)
    )
    pair = steps.PairBatch(*batch_of(mesh, (B, S), (B, S), (B, T), (B, T), (B, T), (B, T)))
    yield measure(
        "reference log-probs (training)",
        name,
        B,
        steps.reference_pair_logprobs.lower(model, pair, normalize="sum"),
    )
    # As the loop calls it (`steps.with_reference`): the reference's log-probs come in with the
    # batch, so jit drops the unused reference model from the step's arguments.
    pair = pair._replace(
        **dict(zip(("ref_w", "ref_l"), batch_of(mesh, (B,), (B,), dtype=jnp.float32), strict=True))
    )
    yield measure(
        "IPO step",
        name,
        B,
        steps.make_policy_step("ipo", opt).lower(
            model, abstract_opt_state(opt, model, mesh), model, pair, hp, scalar
        ),
    )
    draw = jax.jit(lambda m, x, xm, k: sampling.sample(m, x, xm, key=k, max_len=T))
    for what, B in (("training", cfg.rl_batch), ("evaluation", cfg.eval_batch)):
        x, xm = batch_of(mesh, (B, S), (B, S))
        yield measure(f"sampling ({what} batch)", name, B, draw.lower(model, x, xm, key))
    B = cfg.eval_batch
    x, xm = batch_of(mesh, (B, S), (B, S))
    exact = jax.jit(lambda p, r, x, xm, k: kl.sampled_kl(p, r, x, xm, key=k, max_len=T).exact)
    yield measure("exact KL (policy + reference)", name, B, exact.lower(model, model, x, xm, key))


def pm_programs(cfg: StudyConfig, model_cfg, mesh, name: str, train_batch: int):
    """The PM train step (both orders of every pair) and a judgement of a batch of pairs, at
    the batch the study judges whole datasets with (`trainers.JUDGE_BATCH`) and at the
    evaluation batch where that differs (win rates: the golden PM; the proxy's own)."""
    S, T = cfg.prompt_len, cfg.target_len
    model = abstract_model(model_cfg, mesh)
    key = abstract_key(mesh)
    opt = trainers.adam_with_warmup(0.0, 0)
    B = train_batch
    pairs = preference.PreferenceBatch(
        *batch_of(mesh, (B, S), (B, S), (B, T), (B, T), (B, T), (B, T))
    )
    yield measure(
        "PM train step (both orders)",
        name,
        B,
        trainers._pm_step("pairwise-both").lower(
            model, abstract_opt_state(opt, model, mesh), pairs, key
        ),
    )
    judge = jax.jit(preference.judge)
    for B in sorted({trainers.JUDGE_BATCH, cfg.eval_batch}):
        yield measure(
            "PM judgement (both orders)",
            name,
            B,
            judge.lower(model, *batch_of(mesh, (B, S), (B, S), (B, T), (B, T), (B, T), (B, T))),
        )


def tree_bytes(tree) -> int:
    """Bytes per device of an abstract pytree: each array leaf's shard on its mesh (the
    largest shard where a dimension does not divide)."""
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct)]
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)


def study_order(cfg: StudyConfig) -> list[str]:
    """The policy sizes in the order the study trains them: its own policy (with the
    pipeline and the main experiments), then Fig. 10's other sizes in `scaling_models` order."""
    return [cfg.policy_model] + [m for m in cfg.scaling_models if m != cfg.policy_model]


class Beside:
    """What the study holds on the device beside each program, in bytes
    per device of the mesh: models of the study's sizes and Adam's moments of a trained one.

    The study runs in this order (one process): the main size's SFT; the golden PM (beside
    its training: its initial and best copies, and the SFT policy); the golden baseline; the
    proxy PM (the same, and the golden PM); the main size's policy runs; then each other size
    of `scaling_models`, its SFT and its runs. Finished models stay cached (`Study._memo`):
    both PMs and every size's SFT policy, the reference of its runs. A policy run holds its
    policy and Adam's two moments, a semi-online run (main size) also its sampling copy; the
    programs' own arguments are not counted again. Checked against the live arrays of a
    one-process micro study (`tests/test_memory_plan.py`)."""

    def __init__(self, cfg: StudyConfig, mesh):
        vocab = cfg.vocab_size
        self.cfg, self.order = cfg, study_order(cfg)
        self.bytes, self.moments = {}, {}
        for name, which, opt in [
            ("golden", cfg.golden_model, trainers.adam_with_warmup(0.0, 0)),
            ("proxy", cfg.policy_model, trainers.adam_with_warmup(0.0, 0)),
        ] + [(m, m, steps.make_optimizer()) for m in self.order]:
            model = abstract_model(cfg.preset_model(which, vocab), mesh)
            self.bytes[name] = tree_bytes(model)
            self.moments[name] = tree_bytes(abstract_opt_state(opt, model, mesh))

    def _cached(self, size: str) -> list[tuple[str, int]]:
        """Both PMs (the proxy from its training on: the golden baseline's run, before it,
        holds less) and the SFT policies of the sizes trained before `size`."""
        done = self.order[: self.order.index(size)]
        held = [("golden PM", self.bytes["golden"]), ("proxy PM", self.bytes["proxy"])]
        return held + [(f"SFT {m}", self.bytes[m]) for m in done]

    def _policy(self, size: str, *items: str, semi_online: bool = True) -> list[tuple[str, int]]:
        """The cached models and the named items of a policy run of `size` ("policy",
        "moments", "reference": its SFT policy). The main size's semi-online runs also hold
        the sampling copy of the policy (refreshed every s steps), unless `semi_online` is
        False (a context that only other runs have)."""
        named = {
            "policy": (f"policy {size}", self.bytes[size]),
            "moments": (f"Adam moments {size}", self.moments[size]),
            "reference": (f"SFT {size} (reference)", self.bytes[size]),
        }
        held = self._cached(size) + [named[i] for i in items]
        if semi_online and size == self.cfg.policy_model:
            held.append((f"policy {size} sampling copy (semi-online)", self.bytes[size]))
        return held

    def _pm_training(self, pm: str, *, moments: bool) -> list[tuple[str, int]]:
        held = [(f"{pm} PM initial", self.bytes[pm]), (f"{pm} PM best", self.bytes[pm])]
        held.append((f"SFT {self.cfg.policy_model}", self.bytes[self.cfg.policy_model]))
        if pm == "proxy":
            held.append(("golden PM", self.bytes["golden"]))
        if moments:
            held.append((f"Adam moments {pm} PM", self.moments[pm]))
        return held

    def contexts(self, plan: Plan, role: str) -> list[list[tuple[str, int]]]:
        """Every context the study runs `plan`'s program of `role` ("golden", "proxy" or a
        policy size) in, each as the list of (what, bytes) it holds beside the program's own
        arguments."""
        program = plan.program
        if role in ("golden", "proxy"):
            if program.startswith("PM train step"):  # its arguments: the PM, its moments
                return [self._pm_training(role, moments=False)]
            out = []
            if plan.batch == trainers.JUDGE_BATCH:  # validation during its own training
                out.append(self._pm_training(role, moments=True))
            if plan.batch == self.cfg.eval_batch:  # win rates, inside a policy run
                # The golden PM judges every run's samples, the proxy every size's online
                # runs' (over-optimisation; not the semi-online runs'); the judging PM is the
                # argument.
                for size in self.order:
                    held = self._policy(
                        size, "policy", "moments", "reference", semi_online=role == "golden"
                    )
                    out.append([h for h in held if h[0] != f"{role} PM"])
            return out
        size = role
        if size not in self.order:
            raise ValueError(
                f"policy size {size!r} is not one the study runs ({', '.join(self.order)}: "
                "its policy_model, then its scaling_models)"
            )
        if program == "SFT step":  # its arguments: the model, its moments
            initial = (f"{size} initial", self.bytes[size])
            if size == self.cfg.policy_model:
                return [[initial]]  # the study's first stage
            return [self._cached(size) + [initial]]
        if program == "IPO step":  # arguments: the policy, its moments (reference log-probs in)
            return [self._policy(size, "reference")]
        if program.startswith("reference log-probs"):  # argument: the reference
            return [self._policy(size, "policy", "moments")]
        if program.startswith("exact KL"):  # arguments: the policy and the reference
            return [self._policy(size, "moments")]
        if program.startswith("sampling"):  # argument: the policy
            return [self._policy(size, "moments", "reference")]
        raise ValueError(f"no context for program {program!r}")

    def add(self, plan: Plan, role: str) -> Plan:
        """`plan` with its largest context's bytes (`beside`) and contents (`beside_of`)."""
        held = max(self.contexts(plan, role), key=lambda h: sum(b for _, b in h))
        return dataclasses.replace(
            plan, beside=sum(b for _, b in held), beside_of=", ".join(w for w, _ in held)
        )


def plan(cfg: StudyConfig, mesh, sizes: list[str]):
    """Every program's Plan, in the order of the study, with what it runs beside."""
    vocab = cfg.vocab_size
    golden = cfg.preset_model(cfg.golden_model, vocab)
    proxy = cfg.preset_model(cfg.policy_model, vocab)
    held = Beside(cfg, mesh)
    for p in pm_programs(cfg, golden, mesh, f"golden {cfg.golden_model}", cfg.pm_batch_golden):
        yield held.add(p, "golden")
    for p in pm_programs(cfg, proxy, mesh, f"proxy {cfg.policy_model}", cfg.pm_batch_proxy):
        yield held.add(p, "proxy")
    for size in sizes:
        for p in policy_programs(cfg, cfg.preset_model(size, vocab), mesh, f"policy {size}"):
            yield held.add(p, size)


def device_memory(device) -> int | None:
    """The device's memory in bytes where its runtime reports it (accelerators)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # CPU devices report none
        return None
    return stats.get("bytes_limit")


def gib(b: int) -> str:
    """GiB, or MiB below a tenth of one, 8 characters wide."""
    return f"{b / GIB:7.2f}G" if b >= GIB / 10 else f"{b / 2**20:7.1f}M"


def verdict(p: Plan, limit: int | None) -> str:
    """Whether `p` fits a device of `limit` bytes with what the study holds beside it."""
    if limit is None:
        return ""
    if p.with_beside <= limit:
        return "fits"
    return "fits alone only" if p.total <= limit else "DOES NOT FIT"


def format_row(p: Plan, limit: int | None) -> str:
    fits = verdict(p, limit)
    return (
        f"{p.program:32s} {p.model:16s} {p.batch:5d} {gib(p.arguments)} {gib(p.outputs)} "
        f"{gib(p.temporaries)} {gib(p.total)} {gib(p.beside)} {gib(p.with_beside)}"
        + (f"   {fits}" if fits else "")
    )


def main(argv):
    del argv
    cfg = PRESETS[_PRESET.value]
    if _REMAT.value is not None:
        cfg = dataclasses.replace(cfg, remat=_REMAT.value)
    if _COMPUTE.value is not None:  # as reproduce.py's flag: what the products read
        cfg = dataclasses.replace(cfg, compute_dtype=_COMPUTE.value)
    mesh = sharding.make_mesh(_MESH.value)
    if _SIZES.value:  # the study these sizes make (`study_order`): what each runs beside
        cfg = dataclasses.replace(cfg, scaling_models=tuple(_SIZES.value))
    sizes = list(cfg.scaling_models)
    devices = mesh.devices.flatten()
    limit = int(_MEMORY.value * GIB) if _MEMORY.value is not None else device_memory(devices[0])
    print(
        f"preset {cfg.name}: prompts {cfg.prompt_len} + responses {cfg.target_len} tokens, "
        f"remat {'on' if cfg.remat else 'off'}, compute {cfg.compute_dtype}; mesh "
        f"{dict(mesh.shape)} of {devices[0].device_kind}"
        + (" (simulated: XLA's CPU compiler, an estimate)" if devices[0].platform == "cpu" else "")
    )
    print(
        f"{'program':32s} {'model':16s} {'batch':>5s} {'args':>8s} {'outputs':>8s} "
        f"{'temps':>8s} {'total':>8s} {'beside':>8s} {'with it':>8s}   per device"
        + ("" if limit is None else f", {limit / GIB:.1f} GiB available")
    )
    rows = []
    for p in plan(cfg, mesh, sizes):
        print(format_row(p, limit), flush=True)
        rows.append(p)
    worst = max(rows, key=lambda p: p.with_beside)
    print(
        f"largest: {worst.program} of {worst.model}, {worst.total / GIB:.2f} GiB per device, "
        f"{worst.with_beside / GIB:.2f} GiB with what the study holds beside it"
    )
    print("beside each program (the study's cached models and its run's arrays, `Beside`):")
    for p in rows:
        print(f"  {p.program} of {p.model} (batch {p.batch}): {p.beside_of or 'nothing'}")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            for p in rows:
                row = {**dataclasses.asdict(p), "total": p.total, "with_beside": p.with_beside}
                f.write(json.dumps({**row, "verdict": verdict(p, limit)}) + "\n")


if __name__ == "__main__":
    app.run(main)
