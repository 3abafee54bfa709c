"""Model families: each one's pixel rule, coordinates, chat turn and builds (see :mod:`regioncap.families.base`)."""
