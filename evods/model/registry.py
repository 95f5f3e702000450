"""Model builders by name, as InternEvo's MODEL_INITIALIZER: `model_type` in a training config picks the builder,
which is called with the config's `model` dict.

    from evods.model.registry import MODEL_INITIALIZER

    @MODEL_INITIALIZER.register_module("MY_MODEL")
    def build_my_model(**model_dict): ...
"""

from collections.abc import Callable


class Registry:
    def __init__(self, name: str):
        self.name = name
        self._modules: dict[str, Callable] = {}

    def register_module(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator registering a builder under `name`; a name can be registered once."""

        def register(builder: Callable) -> Callable:
            if name in self._modules:
                raise ValueError(f"{name!r} is already registered in {self.name} (by {self._modules[name]!r}).")
            self._modules[name] = builder
            return builder

        return register

    def get_module(self, name: str) -> Callable:
        if name not in self._modules:
            raise ValueError(f"no {name!r} in {self.name}; registered: {self.names()}")
        return self._modules[name]

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def names(self) -> list[str]:
        return sorted(self._modules)


MODEL_INITIALIZER = Registry("MODEL_INITIALIZER")
