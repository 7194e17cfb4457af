"""Only for the one file pyproject.toml cannot place: `unpatch-lm-eval.pth` at the top of
site-packages, which registers `lm_eval --model unpatch` (see src/unpatch/_lm_eval_hook.py).
Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "unpatch-lm-eval.pth"
SOURCE = Path(__file__).parent / "src" / f"{PTH}.in"  # kept as .in in the repo: a .pth is only meaningful in site-packages


class BuildWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(str(SOURCE), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]

    def get_output_mapping(self):  # editable installs (PEP 660) place what this maps
        mapping = dict(super().get_output_mapping())
        mapping[str(Path(self.build_lib) / PTH)] = str(SOURCE)
        return mapping


setup(cmdclass={"build_py": BuildWithPth})
