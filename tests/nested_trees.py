"""Building and reading nested dict trees (Flax variable collections) in tests."""


def nested(path, value):
  """``value`` under the keys of ``path``: ``nested(('a', 'b'), v) == {'a': {'b': v}}``."""
  for key in reversed(path):
    value = {key: value}
  return value


def merge(*trees):
  """The deep union of nested dicts; later trees win on leaves."""
  out = {}
  for tree in trees:
    for k, v in tree.items():
      out[k] = merge(out[k], v) if isinstance(v, dict) and k in out else v
  return out


def get(tree, path):
  """The value at ``path``."""
  for key in path:
    tree = tree[key]
  return tree
