"""The application around the library: the ``qdiff-ao`` CLI, the main job, sampling, metrics and the bundled model."""

__all__: list[str] = []
