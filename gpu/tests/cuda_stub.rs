//! `CudaDevice::open` where a driver library loads but reports no device: a clean error, not a
//! panic. Builds a stub `libcuda.so` (cuInit answers CUDA_ERROR_NO_DEVICE) with the system C
//! compiler and runs the check in a child process whose library path finds the stub first.

use std::path::PathBuf;
use std::process::Command;

const CHILD: &str = "GPUMEM_CUDA_STUB_CHILD";

const STUB: &str = r#"
typedef int CUresult;
static const char *msg = "no CUDA-capable device is detected (stub)";
static const char *name = "CUDA_ERROR_NO_DEVICE";
CUresult cuInit(unsigned int flags) { (void)flags; return 100; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = msg; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; *s = name; return 0; }
"#;

#[test]
fn a_driver_without_a_device_is_a_clean_error() {
    if std::env::var_os(CHILD).is_some() {
        assert!(gpumem_gpu::cuda::driver_present(), "the stub should load");
        let err = gpumem_gpu::CudaDevice::open(0)
            .err()
            .expect("no device behind the stub");
        assert_eq!(err.kind, gpumem_gpu::DeviceErrorKind::Driver);
        assert!(err.to_string().contains("cannot open the device"), "{err}");
        assert!(err.to_string().contains("CUDA_ERROR_NO_DEVICE"), "{err}");
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-stub");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("stub.c");
    std::fs::write(&src, STUB).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let lib = dir.join("libcuda.so");
    let built = Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("a C compiler (`{cc}`) is needed for this test: {e}"));
    assert!(built.success(), "building the stub libcuda failed");
    std::fs::copy(&lib, dir.join("libcuda.so.1")).unwrap();

    let path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(old) => format!("{}:{}", dir.display(), old.to_string_lossy()),
        None => dir.display().to_string(),
    };
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_driver_without_a_device_is_a_clean_error",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env("LD_LIBRARY_PATH", path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "child ran nothing:\n{text}");
}
