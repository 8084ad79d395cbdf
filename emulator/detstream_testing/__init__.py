"""detstream's test doubles (the ``detstream-testing`` distribution, ``emulator/`` in the repository).

They stand apart from the code they stand in for: nothing here imports ``detstream``, and the
``detstream`` wheel ships none of this.
"""
