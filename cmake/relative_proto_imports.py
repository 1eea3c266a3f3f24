"""Rewrite the imports protoc writes into generated modules so they resolve under modloc.engine._proto.

protoc names a generated module after its .proto path (``modloc/v1/localization.proto`` →
``modloc.v1.localization_pb2``) and imports its dependencies by that absolute name; the
modules are installed under ``modloc.engine._proto``, so ``from modloc.v1 import x_pb2`` becomes
``from modloc.engine._proto.modloc.v1 import x_pb2``. Only our own proto packages are rewritten
(``google.protobuf`` imports stay). Usage: relative_proto_imports.py ROOT PACKAGE...
"""

import pathlib
import re
import sys


def main() -> None:
    root = pathlib.Path(sys.argv[1])
    packages = "|".join(re.escape(p) for p in sys.argv[2:])
    pattern = re.compile(rf"^(\s*)from ({packages})((?:\.\w+)*) import ", re.MULTILINE)
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        fixed = pattern.sub(r"\1from modloc.engine._proto.\2\3 import ", text)
        if fixed != text:
            path.write_text(fixed)


if __name__ == "__main__":
    main()
