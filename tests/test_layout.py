"""The house layout (../shared/STYLE.md): no import cycle among the project's modules, not even
one hidden by an import inside a function, and data flows configs -> input_pipeline -> trainer."""
import ast
import pathlib

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_PACKAGES = ("configs", "input_pipeline", "trainer")


def _imports() -> dict[str, set[str]]:
  """{module: project modules it imports anywhere in its file (top level or in a function)}."""
  modules = {f"{path.parent.name}.{path.stem}": path
             for package in _PACKAGES for path in (_ROOT / package).glob("*.py")
             if path.stem != "__init__"}
  graph = {}
  for name, path in modules.items():
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.ImportFrom) and node.module:
        candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
      elif isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
      else:
        continue
      imported.update(c for c in candidates if c in modules and c != name)
    graph[name] = imported
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
  """One import cycle as a list of modules, or [] if there is none (depth-first search)."""
  state, stack = {}, []

  def visit(module: str) -> list[str]:
    state[module] = "open"
    stack.append(module)
    for target in sorted(graph[module]):
      if state.get(target) == "open":
        return stack[stack.index(target):] + [target]
      if target not in state and (found := visit(target)):
        return found
    state[module] = "done"
    stack.pop()
    return []

  for module in sorted(graph):
    if module not in state and (found := visit(module)):
      return found
  return []


def test_the_import_graph_has_no_cycle():
  graph = _imports()
  assert "input_pipeline.datasets" in graph and graph["trainer.train"]  # The walk found them.
  assert _cycle(graph) == [], " -> ".join(_cycle(graph))


def test_a_planted_cycle_is_found():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_data_flows_from_configs_to_input_pipeline_to_trainer():
  graph = _imports()
  backwards = {(module, target) for module, targets in graph.items() for target in targets
               if _PACKAGES.index(target.split(".")[0]) > _PACKAGES.index(module.split(".")[0])}
  assert not backwards
  config_files = {m for m in graph if m.startswith("configs.") and m != "configs.validate"}
  assert all(target.startswith("configs.") for m in config_files for target in graph[m])
