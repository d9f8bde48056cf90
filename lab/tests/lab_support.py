"""What the lab's tests share beside tests/support.py: an objective's network, a run's defaults, the lab's scripts."""

import lab
import lab.finetune   # noqa: F401  (`import lab.X`, not `from lab import X`: lab/__init__.py binds the name `train`
import lab.train      # noqa: F401   to the core's train.py, which `from lab import train` would return)
import train


def build_model(config, grid, channels):
    """The network of config["objective"] on a grid x grid token layout of `channels` channels."""
    return lab.get(config["objective"]).build(config, grid, channels)


def defaults(objective="lmd"):
    """Every train.py flag's default for a run of `objective`: the shared ones (train.DEFAULTS), each objective's
    own flags at their first declaration, then this objective's own values (its record's flags and defaults)."""
    declared = {key: owners[0][1].default for key, owners in train.own_flags(lab.OBJECTIVES).items()}
    return {**train.DEFAULTS, **declared, **lab.get(objective).run_defaults(), "objective": objective}


def drawn(monkeypatch, draw):
    """The matplotlib Figure that draw() saves (savefig still writes the file), to read what is on it (as
    tests/test_pictures.py's drawn)."""
    from matplotlib.figure import Figure
    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: figures.append(self) or save(self, *args,
                                                                                                       **kwargs))
    draw()
    return figures[-1]
