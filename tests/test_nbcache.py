"""The cache of executed notebooks behind the site: the key follows what decides the outputs,
a stamped copy from the test run is adopted only when its key is current, and a build that must
not execute (CI) says which notebook is missing."""
import nbformat
import pytest

from mag_explore.course import nbcache


def _notebook(path, source="print(1 + 1)"):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# a title"), nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_key_follows_cells_and_settings_not_outputs(tmp_path, monkeypatch):
    monkeypatch.delenv("MAG_EXPLORE_STEPS", raising=False)
    path = _notebook(tmp_path / "a.ipynb")
    key = nbcache.cache_key(path)
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="2\n")]
    nbformat.write(nb, path)
    assert nbcache.cache_key(path) == key, "outputs are what the cache stores, not part of its key"
    monkeypatch.setenv("MAG_EXPLORE_STEPS", "3")
    assert nbcache.cache_key(path) != key, "a setting the parameters cell reads changes the outputs"
    monkeypatch.delenv("MAG_EXPLORE_STEPS")
    _notebook(path, "print(2 + 2)")
    assert nbcache.cache_key(path) != key


def test_a_stamped_copy_is_adopted_only_while_current(tmp_path):
    path = _notebook(tmp_path / "a.ipynb")
    executed_dir, cache = tmp_path / "executed", tmp_path / "cache"
    executed_dir.mkdir()
    nb = nbformat.read(path, as_version=4)
    nbcache.stamp(nb, path)
    nbformat.write(nb, executed_dir / "a.ipynb")
    found = nbcache.executed([path], cache, adopt_from=executed_dir, allow_execute=False)
    assert found[path][1] == "adopted" and found[path][0].exists()
    assert nbcache.executed([path], cache, allow_execute=False)[path][1] == "cached"
    _notebook(path, "print('changed')")  # the source moved on: the old copy must not be used
    with pytest.raises(RuntimeError, match="a.ipynb"):
        nbcache.executed([path], cache, adopt_from=executed_dir, allow_execute=False)


@pytest.mark.slow
def test_a_missing_notebook_is_executed_once_and_stamped(tmp_path):
    path = _notebook(tmp_path / "a.ipynb")
    cache = tmp_path / "cache"
    first = nbcache.executed([path], cache, jobs=1)
    target, how = first[path]
    assert how == "executed"
    nb = nbformat.read(target, as_version=4)
    assert nb.cells[1].outputs[0]["text"] == "2\n"
    assert nb.metadata["mag_explore"]["cache_key"] == nbcache.cache_key(path)
    assert nbcache.executed([path], cache, allow_execute=False)[path] == (target, "cached")
