"""Containers that count the items read from them: a cost test counts what an operation reads (a queue's head, a
prompt's digests, the router's requests) rather than timing it."""


def counting(base: type) -> type:
    """A subclass of `base` (list, deque, dict) whose `reads` (one count for all its instances) grows by each item
    its iteration, `values()`, `items()` or a slice hands out."""
    class Counting(base):
        reads = 0

        def _count(self, items):
            for item in items:
                Counting.reads += 1
                yield item

        def __iter__(self):
            return self._count(super().__iter__())

        def __getitem__(self, key):
            if isinstance(key, slice):  # a copy reads each item it takes
                Counting.reads += len(range(*key.indices(len(self))))
            return super().__getitem__(key)

        if issubclass(base, dict):
            def values(self):
                return self._count(super().values())

            def items(self):
                return self._count(super().items())

    return Counting
