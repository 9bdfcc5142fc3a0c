"""How gradguard reads the user's program: one implementation of each technique.

- :mod:`~gradguard.introspect.frames`: the user's frames on the stack and their variables;
- :mod:`~gradguard.introspect.naming`: the variable, attribute or container that holds an object;
- :mod:`~gradguard.introspect.sites`: the source line that fills a variable or sets an attribute;
- :mod:`~gradguard.introspect.spelling`: misspellings of ``requires_grad`` and the lines that assign one;
- :mod:`~gradguard.introspect.graph`: bounded walks over autograd graphs;
- :mod:`~gradguard.introspect.device`: a boolean computed on an accelerator, read without waiting;
- :mod:`~gradguard.introspect.dtensor`: a ``DTensor``'s local shard and version counters, read with no collective.
"""
