"""Raw brain MRI (OASIS-1, BIDS/OASIS-3, NIfTI folders, the 2D PNG release) → axial slices.

Entry points: :func:`data_prep.prepare.prepare_dataset` (the ``prepare`` stage) and
:func:`data_prep.demo_cohort.build_demo_cohort` (the ``make_demo`` stage). The file kinds
(:mod:`data_prep.files`) and the image reader (:mod:`data_prep.images`) are shared with
``sdedit``, ``inpaint`` and the augmentation dataset, so every command reads a file alike.
"""
