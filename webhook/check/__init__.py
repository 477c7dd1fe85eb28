"""`outrider check`: is Outrider installable here, and is the installed webhook healthy?

`facts` is what the cluster said, `evaluate` turns facts into results (pure), `gather` asks the
Kubernetes API (the only module with I/O), `cli` wires them into the `outrider check` sub-command.
"""
