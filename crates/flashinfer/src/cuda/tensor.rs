//! Typed views of device memory passed to the engine's ops.
//!
//! A view is a device pointer, an element count and a lifetime. Built from a cudarc slice it
//! borrows the slice; built from a raw pointer (memory owned by a framework) it is `unsafe` and the
//! caller vouches for the pointer. Either way the ops check lengths against shapes before launching,
//! so a kernel never indexes past `len`.

use std::marker::PhantomData;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

pub use cudarc::driver::DeviceRepr;

/// Read-only view of `len` elements of `T` in device memory.
#[derive(Clone, Copy, Debug)]
pub struct DevSlice<'a, T> {
    ptr: CUdeviceptr,
    len: usize,
    _borrow: PhantomData<&'a T>,
}

/// Writable view of `len` elements of `T` in device memory.
#[derive(Debug)]
pub struct DevSliceMut<'a, T> {
    ptr: CUdeviceptr,
    len: usize,
    _borrow: PhantomData<&'a mut T>,
}

impl<'a, T> DevSlice<'a, T> {
    /// Views a cudarc slice.
    pub fn new(s: &'a CudaSlice<T>, stream: &CudaStream) -> Self {
        let (ptr, _sync) = s.device_ptr(stream);
        Self {
            ptr,
            len: s.len(),
            _borrow: PhantomData,
        }
    }

    /// Views caller-owned device memory.
    ///
    /// # Safety
    /// `ptr` must point to at least `len` initialised elements of `T` in device memory of the
    /// context the op runs on, aligned for `T` (16 bytes for vectorised kernels, which check it),
    /// and stay valid and unwritten by others until the op's work on the stream has finished.
    pub unsafe fn from_raw(ptr: CUdeviceptr, len: usize) -> Self {
        Self {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }

    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<'a, T> DevSliceMut<'a, T> {
    pub fn new(s: &'a mut CudaSlice<T>, stream: &CudaStream) -> Self {
        let len = s.len();
        let (ptr, _sync) = s.device_ptr_mut(stream);
        Self {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }

    /// Views caller-owned writable device memory.
    ///
    /// # Safety
    /// As [`DevSlice::from_raw`], and nothing else may read or write the memory until the op's
    /// work on the stream has finished.
    pub unsafe fn from_raw(ptr: CUdeviceptr, len: usize) -> Self {
        Self {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }

    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Re-borrows as a shorter-lived writable view.
    pub fn reborrow(&mut self) -> DevSliceMut<'_, T> {
        DevSliceMut {
            ptr: self.ptr,
            len: self.len,
            _borrow: PhantomData,
        }
    }
}
