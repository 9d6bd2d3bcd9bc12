"""Raw brain MRI (OASIS-1, BIDS/OASIS-3, NIfTI folders, the 2D PNG release) → axial slices.

Entry points: :func:`data_prep.prepare.prepare_dataset` (the ``prepare`` stage) and
:func:`data_prep.demo_cohort.build_demo_cohort` (the ``make_demo`` stage).
"""
