"""Read an InternEvo-style Python config file into a plain dict, as InternEvo's `Config.from_file` does.

The file is executed as a module; every top-level name that is not a module or a class becomes a key. Names starting
with "_" are left out: InternEvo skips only dunders, but evods rejects unknown keys, so "_" marks a private helper.

InternEvo's inheritance form is read without importing InternEvo:

    from internlm.utils.utils import read_base
    with read_base():
        from configs._base_.default_runtime import *
        from configs._base_.models.internlm_7B import *

The `read_base` import is dropped and each import inside the block executes the named file (found next to or above
the config, as `configs/_base_/...`, or below the working directory, where InternEvo's `train.py` finds it) and
copies its names in, as Python's `import *` does. The lines after the block then override what the bases set.
"""
import ast
import inspect
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

READ_BASE = "read_base"


@dataclass(frozen=True)
class ConfigSource:
    """Where the values came from, so that errors can name the file and the line. `bases`: the files read through
    `read_base()`, in import order."""

    path: Path
    text: str
    bases: tuple["ConfigSource", ...] = ()

    def line_of(self, key_path: str) -> int | None:
        """The line that sets `key_path` ("data.micro_num", "model", "monitor.alert.enable_feishu_alert") in this
        file, if found."""
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

    def locate(self, key_path: str) -> str:
        """"file:line" of the assignment that set `key_path`: this file first, then the bases, latest first."""
        for source in (self, *reversed(self.bases)):
            line = source.line_of(key_path) if key_path else None
            if line:
                return f"{source.path}:{line}"
        return str(self.path)

    def error(self, key_path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.locate(key_path)}: {message}")


def _dict_entry(node: ast.AST | None, key: str) -> ast.AST | None:
    """The value node for `key` in a `dict(key=...)` call or a `{"key": ...}` literal."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return next((kw.value for kw in node.keywords if kw.arg == key), None)
    if isinstance(node, ast.Dict):
        return next((value for k, value in zip(node.keys, node.values)
                     if isinstance(k, ast.Constant) and k.value == key), None)
    return None


def _is_read_base_block(statement: ast.stmt) -> bool:
    def names_read_base(expr: ast.expr) -> bool:
        func = expr.func if isinstance(expr, ast.Call) else None
        return (isinstance(func, ast.Name) and func.id == READ_BASE) or \
            (isinstance(func, ast.Attribute) and func.attr == READ_BASE)
    return isinstance(statement, ast.With) and any(names_read_base(item.context_expr) for item in statement.items)


def _without_read_base_import(statement: ast.stmt) -> ast.stmt | None:
    """`from internlm.utils.utils import read_base` (or mmengine's) is dropped: evods reads the block itself."""
    if not isinstance(statement, ast.ImportFrom) or all(alias.name != READ_BASE for alias in statement.names):
        return statement
    kept = [alias for alias in statement.names if alias.name != READ_BASE]
    return ast.ImportFrom(module=statement.module, names=kept, level=statement.level,
                          lineno=statement.lineno, col_offset=statement.col_offset) if kept else None


def _base_path(statement: ast.ImportFrom, path: Path) -> Path:
    """The file a `from configs._base_.x import *` inside read_base() names. Absolute module names are looked for in
    the config's folder and every folder above it, then in the working directory; relative ones (`from .._base_.x`)
    from the config's folder."""
    relative = Path(*(statement.module or "").split(".")).with_suffix(".py")
    if statement.level:
        roots = [path.parents[statement.level - 1]]
    else:
        roots = [path.parent, *path.parent.parents, Path.cwd()]
    for root in roots:
        if (root / relative).is_file():
            return (root / relative).resolve()
    dots = "." * statement.level
    raise ConfigError(f"{path}:{statement.lineno}: base config {dots}{statement.module} not found: looked for "
                      f"{relative} in {roots[0]}" + (" and the folders above it, and in the working directory"
                                                      if not statement.level else "") +
                      "; put InternEvo's configs/_base_ folder there, or copy the base's keys into this file")


def _import_base(statement: ast.stmt, path: Path, chain: tuple[Path, ...]) -> tuple[dict, list[ConfigSource]]:
    """The names one import line inside read_base() brings in, and the sources it read."""
    if not isinstance(statement, ast.ImportFrom):
        raise ConfigError(f"{path}:{statement.lineno}: only `from ... import ...` lines may stand inside "
                          f"`with {READ_BASE}():`; move other statements below the block")
    base = _base_path(statement, path)
    if base in chain or base == path:
        raise ConfigError(f"{path}:{statement.lineno}: base config {base} imports itself (through "
                          f"{' -> '.join(str(p) for p in chain)})")
    values, sources = _execute(base, chain + (path,))
    if any(alias.name == "*" for alias in statement.names):
        public = values.get("__all__") or [name for name in values if not name.startswith("_")]
        return {name: values[name] for name in public}, sources
    missing = [alias.name for alias in statement.names if alias.name not in values]
    if missing:
        raise ConfigError(f"{path}:{statement.lineno}: base config {base} does not set {', '.join(missing)}")
    return {alias.asname or alias.name: values[alias.name] for alias in statement.names}, sources


def _execute(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, list[ConfigSource]]:
    """Run the config file; its module namespace, and the sources read (this file last)."""
    text = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as error:
        raise ConfigError(f"{path}:{error.lineno}: syntax error in the config: {error.msg}"
                          f"\n    {(error.text or '').strip()}") from error
    module = types.ModuleType(f"evods_user_config_{path.stem}")
    module.__file__ = str(path)
    namespace, bases, pending = vars(module), [], []

    def run(statements: list) -> None:
        try:
            code = ast.fix_missing_locations(ast.Module(body=statements, type_ignores=[]))
            exec(compile(code, str(path), "exec"), namespace)
        except Exception as error:
            line = next((frame.lineno for frame in reversed(traceback.extract_tb(error.__traceback__))
                         if Path(frame.filename).resolve() == path), None)
            raise ConfigError(f"{path}:{line}: the config raised {type(error).__name__}: {error}") from error
        statements.clear()

    for statement in tree.body:
        if _is_read_base_block(statement):
            run(pending)
            for line in statement.body:
                values, sources = _import_base(line, path, chain)
                namespace.update(values)
                bases += sources
        elif (statement := _without_read_base_import(statement)) is not None:
            pending.append(statement)
    run(pending)
    return namespace, [*bases, ConfigSource(path=path, text=text)]


def load_config_file(path: str | Path) -> tuple[dict, ConfigSource]:
    """Execute the config file and return its top-level names as a dict, plus its source for error messages."""
    path = Path(path)
    if path.suffix != ".py":
        raise ConfigError(f"{path}: a training config must be a Python file ending in .py (InternEvo format), "
                          f"e.g. configs/7B_sft.py")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    path = path.resolve()
    namespace, sources = _execute(path)
    values = {name: value for name, value in namespace.items()
              if not name.startswith("_") and not inspect.ismodule(value) and not inspect.isclass(value)}
    own = sources[-1]
    return values, ConfigSource(path=own.path, text=own.text, bases=tuple(sources[:-1]))
