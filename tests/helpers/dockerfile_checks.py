"""Static Dockerfile checks shared by tests/integration/test_dockerfiles.py: a small Dockerfile parser,
the build context (the repository minus ``.dockerignore``) and the checks, as functions returning problems
(so the tests can show they catch a broken file)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
IMAGES = ("controlplane", "learner", "learner-cpu", "robot", "llm-actor")
CUDA_IMAGES = {"learner", "llm-actor"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# -- a small Dockerfile parser -------------------------------------------------------------------
class Instruction(NamedTuple):
    keyword: str
    value: str
    line: int


@dataclass
class Stage:
    index: int
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile: comment lines dropped, ``\\`` continuations joined, global ARG
    defaults substituted into FROM (as the builder does)."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and buf):
            continue  # comments (and blank lines) inside a continuation are removed by Docker too
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf.strip():
            logical.append((start, buf.strip()))
        buf = ""
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for line, content in logical:
        keyword, _, value = content.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            parts = [p for p in value.split() if not p.startswith("--platform")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(len(stages), image, name))
        elif not stages and keyword == "ARG":
            k, _, v = value.partition("=")
            global_args[k.strip()] = v.strip().strip('"')
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, value, line))
    return stages


def exec_form(value: str) -> list[str]:
    """The argv of an exec-form (JSON) ENTRYPOINT/CMD; shell form is refused."""
    assert value.startswith("["), f"not exec form (JSON array): {value!r}"
    argv = json.loads(value)
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv), value
    return argv


def copy_args(value: str) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY/ADD instruction, shell or JSON form."""
    flags = {}
    while m := re.match(r"--([\w-]+)(?:=(\S*))?\s+", value):
        flags[m.group(1)], value = m.group(2) or "", value[m.end():]
    tokens = json.loads(value) if value.startswith("[") else shlex.split(value)
    assert len(tokens) >= 2, f"COPY needs a source and a destination: {value!r}"
    return flags, tokens[:-1], tokens[-1]


def exposed_ports(stage: Stage) -> set[int]:
    return {int(p.split("/")[0]) for i in stage.all("EXPOSE") for p in i.value.split()}


# -- the build context: the repository minus .dockerignore ----------------------------------------
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Go filepath.Match plus ``**`` (any number of path segments), as Docker's patternmatcher."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern[i:i + 1] == "/":
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1:j]
            out += "[" + ("^" + body[1:] if body[:1] in "^!" else body) + "]"
            i = j
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.startswith("!"), _glob_regex(os.path.normpath(ln.lstrip("!").strip().lstrip("/")))) for ln in lines]


def _prefixes(rel: str) -> list[str]:
    """``a``, ``a/b``, ``a/b/c`` for ``a/b/c``."""
    parts = rel.split("/")
    return ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]


def is_ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """A path is out of the context when the last rule matching it, or one of its parents, excludes it."""
    ignored = False
    for negate, rx in rules:
        if any(rx.match(p) for p in _prefixes(rel)):
            ignored = not negate
    return ignored


def context_files(root: Path, dockerignore: str) -> set[str]:
    """Relative posix paths of every file the builder would receive."""
    rules = dockerignore_rules(dockerignore)
    can_prune = not any(neg for neg, _ in rules)
    files = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        if can_prune:
            dirnames[:] = [d for d in dirnames if not is_ignored(rel_dir + d, rules)]
        files.update(rel_dir + f for f in filenames if not is_ignored(rel_dir + f, rules))
    return files


def source_matches(src: str, files: set[str]) -> list[str]:
    """Context files a COPY source (path, directory or glob) brings in."""
    src = os.path.normpath(src).lstrip("/")
    rx = _glob_regex(src)
    return sorted(f for f in files if src == "." or any(rx.match(p) for p in _prefixes(f)))


# -- the checks, as functions returning problems (so tests can show they catch a broken file) -----
def copy_problems(stages: list[Stage], files: set[str]) -> list[str]:
    problems = []
    for stage in stages:
        earlier = {s.name for s in stages[:stage.index] if s.name} | {str(s.index) for s in stages[:stage.index]}
        for ins in stage.all("COPY") + stage.all("ADD"):
            flags, sources, _ = copy_args(ins.value)
            if "from" in flags:
                if flags["from"] not in earlier:
                    problems.append(f"line {ins.line}: --from={flags['from']} is not an earlier stage ({sorted(earlier)})")
                continue
            for src in sources:
                if re.match(r"https?://", src):
                    problems.append(f"line {ins.line}: remote source {src} (not reproducible; pin it in the build instead)")
                elif not source_matches(src, files):
                    problems.append(f"line {ins.line}: COPY source {src!r} is not in the build context")
    return problems


def pin_problems(stages: list[Stage]) -> list[str]:
    problems = []
    for stage in stages:
        if stage.image in {s.name for s in stages[:stage.index]}:
            continue
        ref = stage.image.split("@")[0]
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else None
        if "@sha256:" not in stage.image and (tag is None or tag == "latest" or "$" in ref):
            problems.append(f"FROM {stage.image} is not pinned to an exact tag or digest")
    return problems


def user_problems(final: Stage) -> list[str]:
    if not final.all("USER"):
        return ["the final stage has no USER (runs as root)"]
    user = final.all("USER")[-1].value
    m = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    if not m:
        return [f"USER {user!r} is not a numeric uid (Kubernetes runAsNonRoot needs one)"]
    return [f"USER {user} is root"] if int(m.group(1)) == 0 else []


def secret_problems(stages: list[Stage]) -> list[str]:
    rx = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ADMIN_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
    problems = []
    for stage in stages:
        for ins in stage.all("ENV") + stage.all("ARG"):
            for key in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", ins.value) or [ins.value.split()[0]]:
                if rx.search(key):
                    problems.append(f"line {ins.line}: {ins.keyword} {key} bakes a secret into the image")
        for ins in stage.all("COPY") + stage.all("ADD"):
            if any(re.search(r"\.(key|pem|p12)$|id_rsa|\.env$", s) for s in copy_args(ins.value)[1]):
                problems.append(f"line {ins.line}: copies key material")
    return problems


def load(name: str) -> list[Stage]:
    return parse_dockerfile((DOCKER / f"{name}.Dockerfile").read_text())


def install_stage(stages: list[Stage]) -> Stage:
    """The stage that runs ``pip install .`` (the builder)."""
    found = [s for s in stages if any(re.search(r"pip install [^&]*\s\.(\s|$)", i.value) for i in s.all("RUN"))]
    assert len(found) == 1, "exactly one stage must run `pip install .`"
    return found[0]


def run_text(stage: Stage) -> str:
    return "\n".join(i.value for i in stage.all("RUN"))


def parse_cli(argv: list[str]):
    """Parse ``argv`` (after the console script) with the project's own parser; AssertionError on refusal."""
    from services.cli import build_parser
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"`fleetloop {' '.join(argv)}` is refused by the CLI: {err.getvalue().strip()}") from None
    assert callable(getattr(args, "func", None)), f"`fleetloop {' '.join(argv)}` names no runnable subcommand"
    return args
