"""Where the caption stage runs besides this process (``executor=...``).

``local`` (the default) is the caption stage of :mod:`regioncap.run` itself;
``ray`` (:mod:`regioncap.executors.ray_executor`) runs it over a Ray cluster.
Each executor module imports its engine (Ray...) only when it is picked.
"""
