"""Image and distribution measures (SSIM, PSNR, MS-SSIM, LPIPS, fd_alex, KID, precision/recall)."""
