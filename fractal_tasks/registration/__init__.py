"""The registration itself: shifts between images, their verdicts, consensus.

``shift`` estimates one translation between two arrays and judges it from its
own evidence; ``calculate`` runs it per ROI pair of two OME-Zarr images and
builds the tables; ``consensus`` turns stored translations into the windows every
acquisition shows.
"""
