"""Ray Data jobs: annotation, evaluation and the end-to-end demo."""
