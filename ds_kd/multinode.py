"""``python -m ds_kd.multinode check --hostfile H``: the same command as ``python -m ds_kd.cli.multinode`` (the
pre-flight check of a multi-node run; docs/multi-node.md), under the shorter name."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("ds_kd.cli.multinode", run_name="__main__", alter_sys=True)
