"""Run one experiment of configs/ (one row of the paper's tables, or a sweep) with one command:
torchrun on this node, or a SLURM job per run through run_with_submitit.py.

    scripts/reproduce.sh configs/detr_r50_dap.toml --coco_path /data/coco             # all local GPUs
    scripts/reproduce.sh configs/detr_r50_dap.toml --coco_path /data/coco --gpus 4    # accumulates 2 steps
    scripts/reproduce.sh configs/detr_r50_dap.toml --coco_path /data/coco --slurm --nodes 1 --gpus 8 \
        -- --partition gpu --timeout 1440
    scripts/reproduce.sh configs/ablation_sigma.toml --set dap_sigma=0.1 ...          # one point of a sweep

Each run writes everything under OUTPUT_ROOT/<config name>[/<key>=<value>]; running the same
command again continues from its checkpoint.pth. `--set KEY=VALUE` overrides a config entry
(a main.py flag or max_batch_per_gpu); flags after `--` are passed on unchanged (to
run_with_submitit.py with --slurm, so SLURM options go there), after the config's flags.

`KEY = true` passes --KEY; `KEY = false` passes the flag's off form where it has one (ema = false:
--no_ema; aux_loss = false: --no_aux_loss) and nothing where leaving the flag out is off (sgd =
false). Every entry of every run is checked with main.py's parser before any run starts: an unknown
key, a value main.py refuses, or a false that no flag can express is refused with one line that
names the config file (or the --set) and the key.
"""
import argparse
import difflib
import functools
import hashlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

import main as detr_main
from run_with_submitit import continue_in_output_dir, get_launcher_parser
from util.args import OneLineParser
from util.errors import UserInputError

REPO = Path(__file__).resolve().parent.parent

LAUNCH_KEYS = {"max_batch_per_gpu"}
# Set by this script from its own options, never by a config.
RESERVED = {"coco_path", "output_dir", "accum_iter"}


def load_config(path):
    """Read a config: {'flags': {main.py flag: value}, 'launch': {...}, 'sweep': {key: [values]}}."""
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        raise UserInputError(f"config not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserInputError(f"{path} is not valid TOML: {e}") from None
    unknown = set(config) - {"flags", "launch", "sweep"}
    if unknown or "flags" not in config:
        raise UserInputError(f"{path}: expected the tables [flags], [launch], [sweep]; found {sorted(config)}")
    config.setdefault("launch", {})
    config.setdefault("sweep", {})
    if set(config["launch"]) - LAUNCH_KEYS:
        raise UserInputError(f"{path}: [launch] accepts {sorted(LAUNCH_KEYS)}, found {sorted(config['launch'])}")
    if len(config["sweep"]) > 1 or any(not isinstance(v, list) or not v for v in config["sweep"].values()):
        raise UserInputError(f"{path}: [sweep] holds one key with a non-empty list of values")
    if RESERVED & (set(config["flags"]) | set(config["sweep"])):
        raise UserInputError(f"{path}: {sorted(RESERVED)} are set by the launcher, not by a config")
    return config


def parse_value(text):
    """A --set value: a TOML literal (1e-5, 12, true, "x") or else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(config, assignments):
    """--set KEY=VALUE: into [launch] for launcher keys, else into [flags]. Setting the swept
    key runs only that value."""
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"--set {item!r}: expected KEY=VALUE")
        if key in RESERVED:
            raise UserInputError(f"--set {key}: set by the launcher (use its own option)")
        value = parse_value(text)
        if key in config["sweep"]:
            config["sweep"][key] = [value]
        else:
            config["launch" if key in LAUNCH_KEYS else "flags"][key] = value
    return config


def sweep_points(config):
    """[(sub-folder, flags)] for every run of the config: one, or one per swept value."""
    if not config["sweep"]:
        return [("", dict(config["flags"]))]
    (key, values), = config["sweep"].items()
    return [(f"{key}={value}", {**config["flags"], key: value}) for value in values]


def split_batch(total, world_size, max_per_gpu):
    """(per-GPU batch, accumulation steps) with total = per-GPU x world_size x steps and the
    per-GPU batch as large as possible but at most max_per_gpu."""
    if total % world_size:
        divisors = [d for d in range(1, total + 1) if total % d == 0]
        raise UserInputError(f"a total batch of {total} images does not split evenly over {world_size} "
                             f"processes; use a number of GPUs (x nodes) among {divisors}")
    per_rank = total // world_size
    accum = next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= max_per_gpu)
    return per_rank // accum, accum


class RefusingParser(argparse.ArgumentParser):
    """An ArgumentParser that raises UserInputError with argparse's message, where argparse prints
    the whole usage and exits, so that the caller can name the config entry it is about."""

    def error(self, message):
        raise UserInputError(message)

    def exit(self, status=0, message=None):
        if status:  # util.args.Unsupported refuses an upstream flag through exit()
            raise UserInputError((message or "").strip().removeprefix("error: "))
        super().exit(status, message)


@functools.cache
def main_flags():
    """main.py's parser, every family's flags included, raising UserInputError. A parse leaves it
    unchanged (util/args.py), so one serves every config."""
    return RefusingParser("main.py", parents=[detr_main.get_args_parser()], add_help=False)


def launcher_flags():
    """run_with_submitit.py's parser, raising UserInputError."""
    return RefusingParser("run_with_submitit.py", parents=[get_launcher_parser()], add_help=False)


def is_switch(action):
    """Whether a flag takes no value and stores True or False (--ema, --no_ema, --no_aux_loss)."""
    return action.nargs == 0 and isinstance(action.const, bool)


def switch_of(key, parser):
    """(setting, value `KEY = true` asks for) when KEY is a switch (ema, no_aux_loss) or the setting
    that switches store (aux_loss, set by --no_aux_loss); else None."""
    action = parser._option_string_actions.get(f"--{key}")
    if action is not None:
        return (action.dest, action.const) if is_switch(action) else None
    if any(is_switch(a) and a.dest == key for a in parser._actions):
        return key, True
    return None


def switch_argv(key, on, parser, defaults):
    """`KEY = true/false` as flags: the switch that stores the wanted value (--ema; ema = false:
    --no_ema), or none where leaving them out gives it (sgd = false; aux_loss = true). Refused where
    neither does: dropping the entry would silently keep the opposite."""
    dest, value_if_true = switch_of(key, parser)
    wanted = value_if_true if on else not value_if_true
    setters = [a for a in parser._actions if is_switch(a) and a.dest == dest and a.const is wanted]
    if parser._option_string_actions.get(f"--{key}") in setters:
        return [f"--{key}"]
    if setters:  # the off form even where it is the default: the command line shows what runs
        return [setters[0].option_strings[0]]
    default = getattr(defaults, dest)
    if default == wanted:
        return []
    model = getattr(defaults, "model", None)
    raise UserInputError(f"no main.py flag sets {dest} to {wanted} (its default"
                         f"{f' for --model {model}' if model else ''} is {default}); remove the entry")


def entry_argv(key, value, parser, defaults):
    """The main.py flags of one config entry: key = value -> --key value, a list -> --key v1 v2,
    true / false of a switch -> switch_argv, "" -> none (the flag's default: `--set finetune=`).
    defaults: every flag's default under the config's --model (defaults_for)."""
    if isinstance(value, bool) and switch_of(key, parser):
        return switch_argv(key, value, parser, defaults)
    if value is False:
        raise UserInputError(f"--{key} is not an on/off flag: give it a value, or remove the entry")
    if value is True:
        return [f"--{key}"]  # a flag that takes a value: main.py's parser says which
    if value == "":
        return []
    return [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]


def defaults_for(flags, parser):
    """Every flag's default under the config's --model (the families' defaults differ)."""
    return parser.parse_args(["--model", str(flags["model"])] if "model" in flags else [])


def to_argv(flags, parser=None):
    """The one place where a config becomes main.py flags (entry_argv of every entry)."""
    parser = parser or main_flags()
    defaults = defaults_for(flags, parser)
    return [arg for key, value in flags.items() for arg in entry_argv(key, value, parser, defaults)]


def check_keys(flags, where, parser):
    """Refuse a key that names no main.py flag (a typo would be dropped, or taken by argparse for
    the flag it abbreviates)."""
    known = {option[2:] for option in parser._option_string_actions if option.startswith("--")}
    known |= {action.dest for action in parser._actions if is_switch(action)}
    for key in flags:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserInputError(f"{where(key)}: main.py has no flag --{key}{hint}; fix the key "
                                 "(python main.py --help lists them)")


def check_entries(flags, where, parser=None):
    """Refuse, before anything runs, an entry that main.py would refuse or that would be lost: an
    unknown key, a value out of its flag's range, a false that no flag expresses. where(key): the
    config file or the --set that gave the key, for the one-line message."""
    parser = parser or main_flags()
    check_keys(flags, where, parser)
    defaults = None
    for key in sorted(flags, key=lambda k: k != "model"):  # --model first: the defaults depend on it
        try:
            if defaults is None:
                defaults = defaults_for(flags, parser)
            parser.parse_args(entry_argv(key, flags[key], parser, defaults))
        except UserInputError as e:
            raise UserInputError(f"{where(key)}: {e.one_line()}") from None


def check_launch(launch, where):
    """[launch] max_batch_per_gpu: a number of images, at least 1 (split_batch divides by it)."""
    value = launch.get("max_batch_per_gpu", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserInputError(f"{where('max_batch_per_gpu')}: must be a positive integer (the most images one "
                             f"GPU takes), got {value!r}")


def origins(config_path, assignments):
    """where(key) for messages: the --set that gave the key, else the config file."""
    overrides = {item.partition("=")[0]: f"--set {item}" for item in assignments}
    return lambda key: overrides.get(key, f"{config_path}, entry {key}")


def resolve_checkpoint(value, checkpoint_dir):
    """A checkpoint named by a config: a URL is used as is (torch.hub checks its hash) unless a
    file of that name is in checkpoint_dir (offline use); a bare file name is looked up in
    checkpoint_dir. A local file whose name carries a hash prefix (detr-r50-e632da11.pth) is
    checked against its SHA-256 before anything starts."""
    name = value.rsplit("/", 1)[-1]
    if value.startswith(("http://", "https://")):
        path = Path(checkpoint_dir) / name if checkpoint_dir else None
        if path is None or not path.is_file():
            return value
    else:
        path = Path(value) if "/" in value else Path(checkpoint_dir or ".") / value
    if not path.is_file():
        raise UserInputError(f"checkpoint {path} not found; download it (docs/REPRODUCE.md) or pass --checkpoint_dir")
    prefix = re.search(r"-([0-9a-f]{8})\.pth$", name)
    if prefix:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        if not sha.hexdigest().startswith(prefix.group(1)):
            raise UserInputError(f"{path}: its SHA-256 starts with {sha.hexdigest()[:8]}, not with the "
                                 f"{prefix.group(1)} of its name; the file is corrupt, download it again")
    return os.path.abspath(path)


def run_flags(flags, launch, *, world_size, coco_path, output_dir, checkpoint_dir):
    """The main.py flags of one run: the config's, the batch split for world_size processes,
    the data and output folders, and --resume from the output folder if the run has started."""
    flags = dict(flags)
    total = int(flags.get("total_batch_size") or 0)  # a TOML string "56" parses too
    if total:
        if "max_batch_per_gpu" not in launch or "batch_size" in flags:
            raise UserInputError("a config with total_batch_size needs [launch] max_batch_per_gpu and no batch_size")
        per_gpu, accum = split_batch(total, world_size, launch["max_batch_per_gpu"])
        flags["accum_iter"] = accum
    for key in ("finetune", "resume"):
        if flags.get(key):
            flags[key] = resolve_checkpoint(flags[key], checkpoint_dir)
    flags.update(coco_path=coco_path, output_dir=output_dir)
    continue_in_output_dir(flags)
    return flags


def commands(opts, extra):
    """[(output folder, command)] of every run of the config, every one checked before any runs."""
    config = apply_overrides(load_config(opts.config), opts.set)
    where = origins(opts.config, opts.set)
    check_launch(config["launch"], where)
    name = Path(opts.config).stem
    world_size = opts.gpus * opts.nodes
    runs = []
    for point, flags in sweep_points(config):
        check_entries(flags, where)
        output_dir = os.path.abspath(os.path.join(opts.output_root, name, point))
        argv = to_argv(run_flags(flags, config["launch"], world_size=world_size,
                                 coco_path=os.path.abspath(opts.coco_path),
                                 output_dir=output_dir, checkpoint_dir=opts.checkpoint_dir))
        if opts.slurm:
            argv = ["--ngpus", str(opts.gpus), "--nodes", str(opts.nodes), *argv, *extra]
            check_command_line(launcher_flags(), argv, opts.config)
            cmd = [sys.executable, str(REPO / "run_with_submitit.py"), *argv]
        else:
            argv += extra
            check_command_line(main_flags(), argv, opts.config)
            launcher = [sys.executable]
            if opts.gpus > 1:
                launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={opts.gpus}"]
            cmd = [*launcher, str(REPO / "main.py"), *argv]
        runs.append((output_dir, cmd))
    return runs


def check_command_line(parser, argv, config_path):
    """The whole command line parses (the config's entries already do: a refusal here is about
    the flags after --)."""
    try:
        parser.parse_args(argv)
    except UserInputError as e:
        raise UserInputError(f"{config_path} with the flags after --: {e.one_line()}") from None


def get_parser():
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           usage="reproduce.sh CONFIG [options] [-- main.py / launcher flags]")
    parser.add_argument("config", help="a file of configs/")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs (processes) per node; default: all visible GPUs (8 with --slurm)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (needs --slurm when > 1)")
    parser.add_argument("--slurm", action="store_true", help="submit through run_with_submitit.py")
    parser.add_argument("--coco_path", default=os.environ.get("COCO_PATH"),
                        help="COCO root with train2017/ val2017/ annotations/ (default: $COCO_PATH)")
    parser.add_argument("--checkpoint_dir", default=os.environ.get("CHECKPOINT_DIR"),
                        help="folder with downloaded checkpoints, for offline use (default: $CHECKPOINT_DIR)")
    parser.add_argument("--output_root", default="outputs", help="one sub-folder per experiment")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry (repeatable)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    opts = get_parser().parse_args(argv)
    try:
        if not opts.coco_path:
            raise UserInputError("pass --coco_path (or set COCO_PATH) to the COCO root folder")
        if opts.gpus is None:
            opts.gpus = 8 if opts.slurm else max(torch.cuda.device_count(), 1)
        if opts.gpus < 1 or opts.nodes < 1:
            raise UserInputError("--gpus and --nodes must be at least 1")
        if opts.nodes > 1 and not opts.slurm:
            raise UserInputError("--nodes > 1 needs --slurm (torchrun here runs on this node only)")
        runs = commands(opts, extra)
    except UserInputError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    for output_dir, cmd in runs:
        print(shlex.join(cmd), flush=True)
        if opts.dry_run:
            continue
        os.makedirs(output_dir, exist_ok=True)
        code = subprocess.call(cmd)
        if code:
            sys.stderr.write(f"error: the run for {output_dir} failed with exit status {code}\n")
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
