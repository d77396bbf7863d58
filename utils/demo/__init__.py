"""The demo's data: scikit-learn's handwritten digits as an ImageFolder, and a ResNet-34 teacher
trained on them with labels (`python -m utils.demo.digits export|teacher`, run by demo.sh)."""
