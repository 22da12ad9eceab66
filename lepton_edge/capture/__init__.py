"""Frame sources: camera index, video file, .npy/.npz of inputs, RTSP/HTTP stream, image folder or glob, GStreamer
pipeline, and whatever installed plug-ins register (entry points `lepton_edge.sources`).

The modules, one job each: `base` (Source, its explicit state, status callbacks, Frame),
`buffers` (the newest-frame and every-frame policies), `registry` (which source reads a spec,
`open_source`), `files` (images, video files), `arrays` (a .npy/.npz's rows, for a model whose input is not
an image), `live` (cameras, streams, GStreamer: the reader
thread and reconnects), `mjpeg` (HTTP MJPEG cameras, read a bounded part at a time), `opencv` (lazy quiet
OpenCV; grab without decoding).
"""
from __future__ import annotations

from lepton_edge.capture.arrays import ArrayFile
from lepton_edge.capture.base import Frame, Listener, Source, SourceOptions, SourceState, StatusUpdate
from lepton_edge.capture.buffers import BufferPolicy
from lepton_edge.capture.files import IMAGE_SUFFIXES, ImageFiles, VideoFile, VideoOptions
from lepton_edge.capture.live import (
           OPEN_TIMEOUT_MS,
           READ_TIMEOUT_MS,
           STREAM_SCHEMES,
           Camera,
           GStreamerPipeline,
           LiveOptions,
           LiveSource,
           Stream,
)
from lepton_edge.capture.registry import ENTRY_POINT_GROUP, known_schemes, open_source, register_source

__all__ = ["ArrayFile", "BufferPolicy", "Camera", "ENTRY_POINT_GROUP", "Frame", "GStreamerPipeline", "IMAGE_SUFFIXES",
           "ImageFiles", "Listener", "LiveOptions", "LiveSource", "OPEN_TIMEOUT_MS", "READ_TIMEOUT_MS",
           "STREAM_SCHEMES", "Source", "SourceOptions", "SourceState", "StatusUpdate", "Stream", "VideoFile",
           "VideoOptions", "known_schemes", "open_source", "register_source"]
