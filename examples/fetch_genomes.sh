#!/usr/bin/env bash
# Fetch the genomes of docs/data.md (public NCBI/GenBank records as redistributed in Debian's example
# packages) into DATA_ROOT/genomes under the names the examples and `make tokenizer` use, and check them.
#   examples/fetch_genomes.sh DATA_ROOT
# Needs curl, ar (binutils), tar with xz, sha256sum; any Linux, not only Debian. The .deb files are kept
# in DATA_ROOT/debs (a re-run re-uses them once their checksum matches). MIRROR: another Debian mirror,
# e.g. one of snapshot.debian.org's archives should deb.debian.org no longer carry these versions.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 DATA_ROOT  (see docs/data.md)" >&2
    exit 2
fi
ROOT=$1
MIRROR=${MIRROR:-https://deb.debian.org/debian}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$ROOT/debs" "$ROOT/genomes"

# pool path, sha256 of the .deb (Debian 12 "bookworm")
DEBS="
pool/main/r/ragout/ragout-examples_2.3-4_all.deb cbe6d0dd8b0e36ef2c93c9b9655955f42019dcd9e9b77388ee58ee54d50bd140
pool/main/k/kleborate/kleborate-examples_2.3.1-2_all.deb 6039a0ee139e0b5f8a288f2bba298326419dc856c166e53e27da319c2d9ce29f
pool/main/g/gasic/gasic-examples_0.0.r19-8_all.deb 0aa190c025c9c69e4897c7cfa52f97c2d2daf917efe8439fae5fa4c21f1eb397
pool/main/b/bowtie2/bowtie2-examples_2.5.0-3_all.deb 9f9f580954187e501102b13484bdecdc2725155e0b8020e7a056a48a06642118
pool/main/r/r-bioc-biostrings/r-bioc-biostrings_2.66.0-1_amd64.deb 94ba289411284aaf42501357cac6f50b559d23d5f9c1300fa1e4f2e91cd4fa12
pool/main/p/python-pyfaidx/python-pyfaidx-examples_0.7.1-2_all.deb dee24dac569e8acccc3edc820fc3916036656c035045fd4e7baaf9cb6860179a
"
# file inside the packages -> name used here
FILES="
usr/share/doc/ragout/examples/E.Coli/references/MG1655-K12.fasta.gz ecoli_MG1655.fasta.gz
usr/share/doc/ragout/examples/H.Pylori/references/G27.fasta.gz hpylori_G27.fasta.gz
usr/share/doc/ragout/examples/H.Pylori/references/SJM180.fasta.gz hpylori_SJM180.fasta.gz
usr/share/doc/ragout/examples/S.Aureus/references/COL.fasta.gz saureus_COL.fasta.gz
usr/share/doc/ragout/examples/S.Aureus/references/N315.fasta.gz saureus_N315.fasta.gz
usr/share/doc/ragout/examples/V.Cholerae/references/O395.fasta.gz vcholerae_O395.fasta.gz
usr/share/doc/kleborate/examples/data/Klebs_HS11286.fna.xz kpneumoniae_HS11286.fna.xz
usr/share/doc/gasic/examples/genomes/dwv.fasta.gz virus_dwv.fasta.gz
usr/share/doc/bowtie2/examples/reference/lambda_virus.fa.gz virus_lambda.fa.gz
usr/lib/R/site-library/Biostrings/extdata/someORF.fa yeast_someORF.fa
usr/share/doc/python-pyfaidx-examples/examples/chr17.hg19.part.fa human_chr17_hg19_part.fa
"

tree="$ROOT/debs/tree"
mkdir -p "$tree"
echo "$DEBS" | while read -r path sum; do
    [ -n "$path" ] || continue
    deb="$ROOT/debs/$(basename "$path")"
    if ! echo "$sum  $deb" | sha256sum -c --status 2>/dev/null; then
        curl -fsSL -o "$deb" "$MIRROR/$path"
        echo "$sum  $deb" | sha256sum -c --quiet
    fi
    (cd "$tree" && ar p "$deb" data.tar.xz | tar -xJf -)
done
echo "$FILES" | while read -r src name; do
    [ -n "$src" ] || continue
    cp "$tree/$src" "$ROOT/genomes/$name"
done
rm -rf "$tree"
(cd "$ROOT" && grep ' genomes/' "$HERE/docs/data.sha256" | sha256sum -c)
