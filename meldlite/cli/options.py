"""Click options derived from the option groups of `meldlite.options`.

    @declared(Runtime, "n_ctx", "n_threads")
    def cmd(n_ctx, n_threads): ...

gives the command `-c/--ctx-size` and `-t/--threads` with the flags, default,
help, range and choices declared once in the group; the command receives
them under the field names and builds the group with `Group.take(kwargs)`.
"""

import click


def click_type(opt):
    """The click type of an `Opt` (ranges and choices as click checks them)."""
    kind = opt.kind
    if isinstance(kind, tuple):
        return click.Choice(list(kind))
    if kind in (int, float):
        if opt.lo is None:
            return kind
        rng = click.IntRange if kind is int else click.FloatRange
        extra = {} if kind is int else {"min_open": opt.lo_open, "max_open": opt.hi_open}
        return rng(opt.lo, opt.hi, **extra)
    if kind == "file":
        return click.Path(dir_okay=False)
    if kind == "dir":
        return click.Path(file_okay=False)
    return None


def click_option(name, opt, default):
    """The click.option decorator of field `name`."""
    kw = {"help": opt.help}
    if opt.kind is bool:
        kw.update(is_flag=True, flag_value=opt.flag_value, default=default)
    else:
        show = opt.show_default
        if show is None:
            show = default is not None
        kw.update(default=default, show_default=show, type=click_type(opt), metavar=opt.metavar)
    return click.option(*opt.flags, name, **kw)


def declared(group, *names, defaults=None):
    """Decorator: the command-line options of `group`'s fields `names` (all with flags if
    none); `defaults` {name: value} replaces a field's default for this command."""
    table = group.opts()
    names = names or tuple(n for n, (opt, _) in table.items() if opt.flags)

    def wrap(fn):
        for name in reversed(names):
            opt, default = table[name]
            default = (defaults or {}).get(name, default)
            if not opt.flags:
                raise ValueError(f"{group.__name__}.{name} has no command-line flags")
            fn = click_option(name, opt, default)(fn)
        return fn

    return wrap
