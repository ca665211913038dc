"""The one place that reads parameters: load params.yaml, validate it against the JSON schema
(which also supplies defaults), resolve tier and experiment overrides into a typed config.

A resolved config is `defaults <- tiers[tier] <- experiments[name] <- experiments[name].tiers[tier]`,
deep-merged, then checked
against `$defs/config` of workflow/schemas/params.schema.yaml. Each section becomes a frozen
dataclass of meanflow/sections.py (its fields in source; a test keeps them equal to the schema's
keys), so the schema is the one definition of every key's default, bounds and meaning.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from meanflow import layout, sections

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "workflow" / "schemas" / "params.schema.yaml"
PARAMS_PATH = ROOT / "params.yaml"
SECTIONS = ("data", "model", "meanflow", "train", "sample")


class ConfigError(ValueError):
    """A parameter is missing or invalid; the message names the file, key and value."""


# --------------------------------------------------------------------------- schema
@cache
def schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


MAX_INT = 2 ** 53   # a float above this is not an exact integer: 1e30 steps is refused, not rounded


def _is_integer(checker, v) -> bool:
    """JSON Schema's integer, but a float only when exactly integral and within MAX_INT."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or isinstance(v, float) and v.is_integer() and abs(v) <= MAX_INT


def _types(sub: dict) -> set:
    t = sub.get("type", ())
    return {t} if isinstance(t, str) else set(t)


def _normal(v, sub: dict):
    """v in the one spelling of its schema type, so equal settings hash equally: an integral float
    of an integer key becomes an int (steps: 60.0 -> 60), an int of a number key a float (lr: 1 -> 1.0)."""
    types = _types(sub)
    if isinstance(v, list) and isinstance(sub.get("items"), dict):
        return [_normal(x, sub["items"]) for x in v]
    if isinstance(v, float) and "integer" in types and "number" not in types and _is_integer(None, v):
        return int(v)
    if isinstance(v, int) and not isinstance(v, bool) and "number" in types and "integer" not in types:
        return float(v)
    return v


def _with_defaults(cls):
    """jsonschema's documented recipe: a validator that fills in `default`s as it validates; values
    are also put in their type's one spelling (_normal) and integers are exact (_is_integer)."""
    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, sch):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
                elif key in instance:
                    instance[key] = _normal(instance[key], sub)
        yield from validate_props(validator, properties, instance, sch)

    types = cls.TYPE_CHECKER.redefine("integer", _is_integer)
    return jsonschema.validators.extend(cls, {"properties": set_defaults}, type_checker=types)


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _non_finite(v: Any, key: str = ""):
    """(key, value) of the first NaN or infinity in a parsed YAML tree (JSON Schema cannot see them)."""
    if isinstance(v, float) and not math.isfinite(v):
        return key or "<top>", v
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        found = _non_finite(x, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def _validate(instance: Any, sch: dict, where: str) -> None:
    bad = _non_finite(instance)
    if bad:
        raise ConfigError(f"{where}: {bad[0]} = {bad[1]}: not a finite number")
    full = {**sch, "$defs": schema()["$defs"]}
    errors = sorted(_Validator(full).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors:
            key = ".".join(str(p) for p in e.absolute_path) or "<top>"
            lines.append(f"  {key}: {e.message}")
        raise ConfigError(f"{where}: invalid parameters\n" + "\n".join(lines))


# --------------------------------------------------------------------------- typed sections
def _freeze(v):
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


@dataclasses.dataclass(frozen=True)
class Config:
    """A resolved configuration: one tier, optionally one experiment."""

    tier: str
    experiment: str | None
    data: sections.DataConfig
    model: sections.ModelConfig
    meanflow: sections.MeanflowConfig
    train: sections.TrainConfig
    sample: sections.SampleConfig
    # the validated dict the sections were built from: what run ids and params hashes hash, and what
    # manifests record; code reads values through the sections
    raw: dict = dataclasses.field(repr=False, compare=False, hash=False)
    # the run directory's name: an experiment row's (and replica's) name for the plan's runs, so a
    # value changed by `dvc exp run -S` keeps the row's paths; None (hand-made configs, a CLI
    # override that changes the run): the run id
    name: str | None = dataclasses.field(default=None, compare=False)
    replicate: int = 0   # replica i of the row's train.replicates (meanflow.plan.replica: seeds + i)

    @property
    def params_hash(self) -> str:
        return hashlib.sha256(json.dumps(_hashed(self.raw), sort_keys=True).encode()).hexdigest()[:10]

    @property
    def run_id(self) -> str:
        """Readable name plus a hash of everything that shapes the trained weights (data, model,
        meanflow, train), so identical configurations asked for by several table rows train once.
        Where things live (x-site keys: data.root, ...) is hashed at its default, so a moved data
        root, or another cluster's, keeps the id (and ids named before the rule stay as they were)."""
        return self._run_id(sites_as_given=False)

    @property
    def previous_run_id(self) -> str:
        """The run id under the rule before x-site keys were left out (it hashed data.root and the
        other x-site keys as given): what a run directory made then records (stages.upgrade)."""
        return self._run_id(sites_as_given=True)

    def _run_id(self, sites_as_given: bool) -> str:
        h = _hashed(self.raw)
        key = {s: h[s] for s in ("data", "model", "meanflow", "train")}
        if not sites_as_given:
            for s in key:
                props = schema()["$defs"][s]["properties"]
                key[s] = {k: props[k].get("default") if props.get(k, {}).get("x-site") else v for k, v in key[s].items()}
        # where and how often a run is logged or saved does not change its weights
        key["train"] = {k: v for k, v in key["train"].items() if k not in RUN_NEUTRAL}
        for (sec, k), off in OFF_DEFAULTS.items():  # keys added later: off = the runs named before them
            if key[sec].get(k, off) == off:
                key[sec] = {kk: v for kk, v in key[sec].items() if kk != k}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
        m = self.model
        name = m.name if m.name != "custom" else f"{m.arch}-d{m.depth}-h{m.hidden}"
        return f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}-{digest}"

    @property
    def run_dir(self) -> Path:
        """runs/<tier>/<name or run_id>: checkpoints, final EMA weights, samples and metrics of one run."""
        return layout.under(self.train.runs_root, self.tier, self.name or self.run_id)


def _hashed(raw: dict) -> dict:
    """raw without the keys marked x-unhashed (how a row's runs are cut into seeds and jobs, never
    a run's own) and those marked x-unhashed-default that sit at their default (a key added later,
    e.g. iMF's, leaves the hashes, so the run ids, of existing configurations as they were), unless
    its x-hashed-when holds ({"section.key": value}: the configurations whose computation the key's
    default changed, e.g. iMF runs under the official init, get new ids rather than stale results)."""
    out = dict(raw)
    for s in SECTIONS:
        props = schema()["$defs"][s]["properties"]
        sec = raw.get(s, {})
        out[s] = {k: v for k, v in sec.items() if not props.get(k, {}).get("x-unhashed")
                  and not (props.get(k, {}).get("x-unhashed-default") and v == props[k].get("default")
                           and not _holds(raw, props[k].get("x-hashed-when")))}
    return out


def _holds(raw: dict, when: dict | None) -> bool:
    return bool(when) and all(raw.get(k.split(".")[0], {}).get(k.split(".")[1]) == v for k, v in when.items())


RUN_NEUTRAL = ("runs_root", "device", "ckpt_every", "keep_ckpts", "keep_ckpts_done", "log_every", "compile")
# (section, key): its "off" value, which leaves the run id as it was before the key existed
OFF_DEFAULTS = {("data", "augment"): 0.0, ("train", "warmup_steps"): 0, ("train", "epochs"): None}


def deep_merge(base: dict, over: dict | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build(raw: dict, tier: str = "custom", experiment: str | None = None, where: str = "config",
          name: str | None = None, replicate: int = 0) -> Config:
    """Validate a (partial) config dict, fill defaults and return the typed Config (`name`: its run
    directory's, default the run id; `replicate`: which replica of its row it is)."""
    raw = copy.deepcopy(raw or {})
    if not re.fullmatch(schema()["properties"]["tier"]["pattern"].strip("^$"), tier):
        raise ConfigError(f"{where}: tier {tier!r}: a tier name is letters, digits, '_', '+' and '-' (it names directories)")
    _validate(raw, {"$ref": "#/$defs/config"}, where)
    secs = {}
    for s in SECTIONS:   # every section is closed (additionalProperties: false): each key is a field
        secs[s] = sections.SECTIONS[s](**{k: _freeze(v) for k, v in raw[s].items()})
    if not raw["meanflow"]["t_start"] <= raw["meanflow"]["t_end"]:
        raise ConfigError(f"{where}: meanflow.t_start ({raw['meanflow']['t_start']}) > meanflow.t_end ({raw['meanflow']['t_end']})")
    _check_shapes(raw, where)
    cfg = Config(tier=tier, experiment=experiment, raw=raw, name=name, replicate=replicate, **secs)
    try:   # the FID's reference statistics resolve (sample.reference against the feature space)
        layout.reference(cfg)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def _check_shapes(raw: dict, where: str) -> None:
    """Shapes the schema cannot see, checked at config time (so before any job): a DiT's hidden
    size splits into its heads and its input into patches; a latent tier's resolution is the
    latent size times the VAE's downsampling factor (a power of two: 8 for sd-vae)."""
    m, d = raw["model"], raw["data"]
    if m["arch"] == "dit":
        named = re.fullmatch(r"MF-[A-Z]+/(\d+)", m["name"] or "")  # models/dit.py's DIT_CONFIGS (torch-free here)
        patch = int(named.group(1)) if named else m.get("patch")
        hidden, heads = (None, None) if named else (m.get("hidden"), m.get("heads"))
        if hidden and heads and hidden % heads:
            raise ConfigError(f"{where}: model.hidden = {hidden} is not divisible by model.heads = {heads}")
        if patch and d["input_size"] % patch:
            raise ConfigError(f"{where}: data.input_size = {d['input_size']} is not divisible by the patch size "
                              f"{patch} (model.{'name = ' + repr(m['name']) if named else 'patch'})")
    if d.get("vae") is not None:
        f, r = d["resolution"] // d["input_size"], d["resolution"] % d["input_size"]
        if r or f & (f - 1):
            raise ConfigError(f"{where}: data.resolution = {d['resolution']} is not data.input_size = "
                              f"{d['input_size']} times a VAE downsampling factor (a power of two: 8 for sd-vae)")


# --------------------------------------------------------------------------- params.yaml
YAML_NODES = 100_000   # the nodes a YAML file may expand to, each alias counted where used (params.yaml: ~1,500)


class YAMLRefused(yaml.YAMLError):
    """A YAML file whose aliases expand past YAML_NODES (an alias bomb) or refer to themselves."""


def _expanded(node, memo: dict) -> int:
    """The node count of `node` with every alias expanded, in time linear in the file (memo)."""
    if id(node) in memo:
        if memo[id(node)] is None:
            raise YAMLRefused("an alias refers to a node that contains it (a recursive structure)")
        return memo[id(node)]
    memo[id(node)] = None
    kids = [x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    memo[id(node)] = n = 1 + sum(_expanded(k, memo) for k in kids)
    return n


def read_yaml(text: str):
    """yaml.safe_load, refusing a document whose aliases expand past YAML_NODES nodes: PyYAML builds
    an alias bomb cheaply as shared objects, but every walk of it (validation, hashing, JSON) is
    exponential. Used wherever a parameters file or a foreign result set is read."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded(node, {})
        if n > YAML_NODES:
            raise YAMLRefused(f"refused: its aliases expand to {n:.3g} nodes, over {YAML_NODES:,} (an alias bomb?)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_params(path: str | Path = PARAMS_PATH) -> dict:
    path = Path(path)
    try:
        params = read_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such parameters file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a parameters file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the parameters file ({e.strerror})") from None
    except YAMLRefused as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:   # one line: the problem and where (PyYAML's own text spans several)
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    _validate(params, {k: v for k, v in schema().items() if k != "$defs"}, str(path))
    return params


def resolve(params: dict, tier: str | None = None, experiment: str | None = None, where: str = "params.yaml") -> Config:
    tier = tier or params["tier"]
    if tier not in params["tiers"]:
        raise ConfigError(f"{where}: tier {tier!r} not in tiers ({', '.join(params['tiers'])})")
    raw = deep_merge(params.get("defaults") or {}, params["tiers"][tier])
    if experiment is not None:
        exps = params.get("experiments") or {}
        if experiment not in exps:
            raise ConfigError(f"{where}: experiment {experiment!r} not in experiments")
        exp = dict(exps[experiment] or {})
        per_tier = (exp.pop("tiers", None) or {}).get(tier)   # an experiment's own tier adjustments, applied last
        raw = deep_merge(deep_merge(raw, exp), per_tier)
    label = f"{where} [tier {tier}" + (f", experiment {experiment}]" if experiment else "]")
    return build(raw, tier, experiment, label, name=layout.run_name(experiment))


def load(path: str | Path = PARAMS_PATH, tier: str | None = None, experiment: str | None = None) -> Config:
    return resolve(load_params(path), tier, experiment, where=str(path))
