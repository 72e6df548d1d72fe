"""Build of the ``fleetloop-client`` wheel from this repository's sources (metadata: pyproject.toml).

What goes in: exactly :data:`MODULES` (copied from the checkout's ``fleetloop/``) and
``fleetloop/v1/*_pb2*.py(i)``, generated from ``proto/`` at build time by grpcio-tools (the build
requirement). Nothing else of the repository: no ``actor``, ``learner``, ``services``, ``bench``.

Checks at build time (the build fails naming the problem):

- every ``fleetloop.*`` import inside the copied modules (top level, inside functions, under
  TYPE_CHECKING) names a module of :data:`MODULES` or the generated code;
- the generated code's own version checks are met by the declared dependencies: its
  ``GRPC_GENERATED_VERSION`` is at most the ``grpcio`` lower bound and its "Protobuf Python
  Version" at most the ``protobuf`` lower bound (pyproject.toml).

Sources: the checkout this file sits in (``../fleetloop``, ``../proto``), or, in an unpacked sdist,
the copy the sdist carries in ``_src/``.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
STAGED = HERE / "_src"

#: Every module of the wheel but the generated code, relative to the source root: the one list.
MODULES = (
    "fleetloop/__init__.py",
    "fleetloop/channels.py",
    "fleetloop/codec.py",
    "fleetloop/errors.py",
    "fleetloop/image_codec.py",
    "fleetloop/logs.py",
    "fleetloop/plugins.py",
    "fleetloop/policies.py",
    "fleetloop/policy_bundle.py",
    "fleetloop/presets.py",
    "fleetloop/specs.py",
    "fleetloop/tls.py",
    "fleetloop/vision.py",
    "fleetloop/weight_wire.py",
    "fleetloop/weights.py",
    "fleetloop/weights_torch.py",
    "fleetloop/wire_settings.py",
    "fleetloop/client/__init__.py",
    "fleetloop/client/connection.py",
    "fleetloop/client/limits.py",
    "fleetloop/client/mlp.py",
    "fleetloop/client/recorder.py",
    "fleetloop/client/runtime.py",
    "fleetloop/client/sender.py",
    "fleetloop/client/spool.py",
    "fleetloop/client/weight_client.py",
    "fleetloop/v1/__init__.py",
)
PROTO = "proto/fleetloop/v1/fleetloop.proto"
#: What grpcio-tools writes for PROTO (relative to the output root).
GENERATED = ("fleetloop/v1/fleetloop_pb2.py", "fleetloop/v1/fleetloop_pb2_grpc.py", "fleetloop/v1/fleetloop_pb2.pyi")


def source_root() -> Path:
    """The checkout (``client/setup.py`` inside it) or an sdist's ``_src``; SystemExit otherwise."""
    if (CHECKOUT / "client" / "setup.py").resolve() == Path(__file__).resolve() and (CHECKOUT / PROTO).is_file():
        return CHECKOUT
    if (STAGED / PROTO).is_file():
        return STAGED
    raise SystemExit(f"fleetloop-client: no sources: neither a fleetloop checkout at {CHECKOUT} nor {STAGED}")


def read_version(root: Path) -> str:
    """``fleetloop.__version__`` read from the source (not imported: its dependencies need not be here)."""
    tree = ast.parse((root / "fleetloop/__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise SystemExit("fleetloop-client: fleetloop/__init__.py defines no __version__")


def _module_name(rel: str) -> str:
    name = rel[:-3].replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def check_imports(root: Path) -> None:
    """SystemExit listing every ``fleetloop.*`` import of a copied module that the wheel would lack.
    ``from P import x`` counts as an import of ``P.x`` when ``P/x.py`` or ``P/x/`` exists in the source."""
    shipped = {_module_name(rel) for rel in MODULES + GENERATED if rel.endswith(".py")}
    missing = []
    for rel in MODULES:
        for node in ast.walk(ast.parse((root / rel).read_text(), filename=rel)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
                for alias in node.names:
                    sub = root / node.module.replace(".", "/") / alias.name
                    if sub.with_suffix(".py").is_file() or sub.is_dir() or alias.name.endswith("_pb2") \
                            or alias.name.endswith("_pb2_grpc"):
                        names.append(f"{node.module}.{alias.name}")
            else:
                continue
            missing += [f"{rel}:{node.lineno} imports {n}" for n in names
                        if n.split(".")[0] == "fleetloop" and n not in shipped]
    if missing:
        raise SystemExit("fleetloop-client: modules the wheel would lack (add them to MODULES in client/setup.py):\n  "
                         + "\n  ".join(missing))


def _lower_bound(package: str) -> tuple[int, ...]:
    text = (HERE / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(package)}>=([0-9.]+)', text)
    if not match:
        raise SystemExit(f"fleetloop-client: pyproject.toml declares no lower bound for {package}")
    return tuple(int(p) for p in match.group(1).split("."))


def check_generated_versions(out: Path) -> None:
    """SystemExit when the generated code needs a newer grpcio / protobuf than pyproject.toml allows."""
    grpc_src = (out / "fleetloop/v1/fleetloop_pb2_grpc.py").read_text()
    pb_src = (out / "fleetloop/v1/fleetloop_pb2.py").read_text()
    needs = {"grpcio": re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_src),
             "protobuf": re.search(r"# Protobuf Python Version: ([0-9.]+)", pb_src)}
    for package, match in needs.items():
        if match is None:
            raise SystemExit(f"fleetloop-client: cannot find the {package} version the generated code needs")
        need = tuple(int(p) for p in match.group(1).split("."))
        if need > _lower_bound(package):
            raise SystemExit(f"fleetloop-client: the generated code needs {package}>={match.group(1)}; raise the lower "
                             "bound in client/pyproject.toml (or pin an older grpcio-tools)")


def generate(root: Path, out: Path) -> None:
    """fleetloop/v1/*_pb2*.py(i) from ``root/proto`` into ``out`` with grpcio-tools' protoc."""
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{root / 'proto'}", f"-I{include}", f"--python_out={out}",
           f"--grpc_python_out={out}", f"--pyi_out={out}", str(root / PROTO)]
    subprocess.run(cmd, check=True)
    for rel in GENERATED:
        if not (out / rel).is_file():
            raise SystemExit(f"fleetloop-client: protoc did not write {rel}")
    check_generated_versions(out)


class BuildPy(build_py):
    """Copy :data:`MODULES` and generate the gRPC code into the build folder (nothing else)."""

    def run(self) -> None:
        root, out = source_root(), Path(self.build_lib)
        check_imports(root)
        shutil.rmtree(out / "fleetloop", ignore_errors=True)  # nothing left from an earlier build's list
        for rel in MODULES:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, out / rel)
        generate(root, out)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [str(Path(self.build_lib) / rel) for rel in MODULES + GENERATED]

    def get_source_files(self) -> list[str]:
        return []  # outside this folder; the sdist carries them in _src/ (Sdist)


class Sdist(sdist):
    """An sdist that builds without the checkout: :data:`MODULES` and the proto copied into ``_src/``."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        root = source_root()
        for rel in MODULES + (PROTO,):
            dst = Path(base_dir) / "_src" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, dst)


if __name__ == "__main__":  # how pip / setuptools run it (importing it only reads the lists and checks)
    setup(version=read_version(source_root()), packages=["fleetloop", "fleetloop.client", "fleetloop.v1"],
          package_dir={}, include_package_data=False, cmdclass={"build_py": BuildPy, "sdist": Sdist})
