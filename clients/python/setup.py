"""Builds the package with its gRPC stubs, generated from the repository's
``proto/`` (or ``$REPLICAST_PROTO_DIR``) when the package is built, so an
installed package imports nothing it has to compile. Everything else is in
pyproject.toml."""

import os
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
PROTO = "replicast/v1/replicast.proto"


def proto_dir() -> pathlib.Path:
    explicit = os.environ.get("REPLICAST_PROTO_DIR")
    directory = pathlib.Path(explicit) if explicit else HERE / ".." / ".." / "proto"
    directory = directory.resolve()
    if not (directory / PROTO).is_file():
        raise SystemExit(
            f"replicast: {PROTO} not found under {directory}; build the package from the replicast "
            "repository (pip install ./clients/python) or set REPLICAST_PROTO_DIR"
        )
    return directory


class BuildPyWithStubs(build_py):
    """build_py, then grpc_tools.protoc into the build tree's replicast/v1/."""

    def run(self):
        super().run()
        import grpc_tools
        from grpc_tools import protoc

        out = pathlib.Path(self.build_lib)
        well_known = pathlib.Path(grpc_tools.__file__).resolve().parent / "_proto"
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_dir()}",
                f"-I{well_known}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                PROTO,
            ]
        )
        if status != 0:
            raise SystemExit(f"replicast: grpc_tools.protoc failed with exit code {status}")
        (out / "replicast" / "v1" / "__init__.py").write_text(
            '"""Generated from proto/replicast/v1/replicast.proto when the package was built."""\n'
        )


setup(cmdclass={"build_py": BuildPyWithStubs})
