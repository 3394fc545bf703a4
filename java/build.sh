#!/usr/bin/env bash
# Build the Java SDK offline with the JDK and Debian's jars, and optionally run its JUnit tests.
#
#   bash java/build.sh          # compile main and test classes into java/build/
#   bash java/build.sh test     # ... then run every JUnit test (live tests need CAPE_TEST_* set)
#
# Needs: default-jdk-headless (17+), libbcprov-java, libgoogle-gson-java, junit5 (scripts/setup.sh
# installs them with apt). Maven Central is never contacted.
set -euo pipefail
cd "$(dirname "$0")"
JARS="${CAPE_JAVA_JARS:-/usr/share/java}"
CP="$JARS/bcprov.jar:$JARS/gson.jar"
JUNIT="$JARS/junit-platform-console-standalone.jar"
for jar in "$JARS/bcprov.jar" "$JARS/gson.jar" "$JUNIT"; do
    [ -f "$jar" ] || { echo "java/build.sh: $jar is missing (apt install libbcprov-java libgoogle-gson-java junit5)" >&2; exit 2; }
done
rm -rf build/classes build/test-classes
mkdir -p build/classes build/test-classes
javac --release 17 -Xlint:all -Xlint:-serial,-path -Werror -encoding UTF-8 -d build/classes -cp "$CP" \
    $(find src/main/java -name '*.java' | sort)
javac --release 17 -Xlint:all -Xlint:-serial,-path -Werror -encoding UTF-8 -d build/test-classes \
    -cp "build/classes:$CP:$JUNIT" $(find src/test/java -name '*.java' | sort)
cp -r src/test/resources/. build/test-classes/ 2>/dev/null || true
if [ "${1:-}" = "test" ]; then
    shift
    java -jar "$JUNIT" --disable-banner --details=summary --fail-if-no-tests \
        -cp "build/classes:build/test-classes:$CP" --scan-classpath build/test-classes "$@"
fi
