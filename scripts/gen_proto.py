"""Regenerate the committed Python code for protos/ into client/proto/ (run by `make proto`).

protoc writes imports relative to the proto root (`from cacheaside.v1 import ...`); we rewrite them to
the package they live in, so the stubs import from an installed wheel without sys.path tricks.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "client" / "proto"
PACKAGE = "client.proto"
_IMPORT = re.compile(r"^(from|import) (cacheaside\.)", re.MULTILINE)


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    plugin_dir = pathlib.Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        return 1
    for path in OUT.rglob("*.py*"):
        text = path.read_text()
        fixed = _IMPORT.sub(rf"\1 {PACKAGE}.\2", text)
        if fixed != text:
            path.write_text(fixed)
    for directory in [OUT, *(p for p in OUT.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").write_text("")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
