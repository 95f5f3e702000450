"""Read an InternEvo-style Python config file into a plain dict, as InternEvo's `Config.from_file` does (§4.1).

The file is executed as a module; every top-level name that is not a module or a class becomes a key. Names starting
with "_" are left out: InternEvo skips only dunders, but evods rejects unknown keys, so "_" marks a private helper.
"""
import ast
import importlib.util
import inspect
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ConfigError


@dataclass(frozen=True)
class ConfigSource:
    """Where the values came from, so that errors can name the file and the line."""

    path: Path
    text: str

    def line_of(self, key_path: str) -> Optional[int]:
        """The line that sets `key_path` ("data.micro_num", "model", "monitor.alert.enable_feishu_alert"), if found."""
        try:
            tree = ast.parse(self.text)
        except SyntaxError:
            return None
        first, *rest = key_path.split(".")
        node, line = None, None
        for statement in tree.body:
            if isinstance(statement, ast.Assign) and any(
                    isinstance(target, ast.Name) and target.id == first for target in statement.targets):
                node, line = statement.value, statement.lineno  # the last assignment wins, as in Python
        for key in rest:
            node = _dict_entry(node, key)
            if node is None:
                break
            line = node.lineno
        return line

    def error(self, key_path: str, message: str) -> ConfigError:
        line = self.line_of(key_path) if key_path else None
        where = f"{self.path}:{line}" if line else str(self.path)
        return ConfigError(f"{where}: {message}")


def _dict_entry(node: Optional[ast.AST], key: str) -> Optional[ast.AST]:
    """The value node for `key` in a `dict(key=...)` call or a `{"key": ...}` literal."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return next((kw.value for kw in node.keywords if kw.arg == key), None)
    if isinstance(node, ast.Dict):
        return next((value for k, value in zip(node.keys, node.values)
                     if isinstance(k, ast.Constant) and k.value == key), None)
    return None


def load_config_file(path: str | Path) -> tuple[dict, ConfigSource]:
    """Execute the config file and return its top-level names as a dict, plus its source for error messages."""
    path = Path(path)
    if path.suffix != ".py":
        raise ConfigError(f"{path}: a training config must be a Python file ending in .py (InternEvo format), "
                          f"e.g. configs/7B_sft.py")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    path = path.resolve()
    source = ConfigSource(path=path, text=path.read_text(encoding="utf-8"))
    spec = importlib.util.spec_from_file_location(f"evods_user_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ConfigError(f"{path}:{error.lineno}: syntax error in the config: {error.msg}"
                          f"\n    {(error.text or '').strip()}") from error
    except Exception as error:
        line = next((frame.lineno for frame in reversed(traceback.extract_tb(error.__traceback__))
                     if Path(frame.filename).resolve() == path), None)
        raise ConfigError(f"{path}:{line}: the config raised {type(error).__name__}: {error}") from error
    values = {name: value for name, value in vars(module).items()
              if not name.startswith("_") and not inspect.ismodule(value) and not inspect.isclass(value)}
    return values, source
