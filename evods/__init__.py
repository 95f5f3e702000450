"""evods: train InternLM models on DeepSpeed with InternEvo's workflow, formats and configs.

`import evods` registers InternLM with transformers' Auto classes (AutoConfig, AutoModel, AutoModelForCausalLM), so
that `from_pretrained` loads an exported folder with evods' model. The registration needs torch and transformers,
which take seconds to import; it happens as soon as transformers is imported (at once if it already is), so that a
command that only prints its `--help` does not pay for them.
"""
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    from . import model  # noqa: F401  (registers InternLM with transformers' Auto classes)


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is first imported, it wraps the real loader so that InternLM is
    registered right after transformers' own module has run, and then leaves sys.meta_path."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _RegisterWhenTransformersLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
