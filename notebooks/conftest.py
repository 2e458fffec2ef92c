"""nbval settings for the notebooks: stderr (progress bars, warnings) is never compared."""


def pytest_collectstart(collector):
    if collector.path.suffix == ".ipynb":
        collector.skip_compare += ("stderr",)
