defmodule Quichex.Connection.UDP do
  @moduledoc false
  # OTP :socket helpers for the hot path, shared by client connections and
  # listeners: open with big buffers and GRO, batched non-blocking reads,
  # GSO sends with a per-message UDP_SEGMENT control message.

  import Bitwise

  @sol_udp 17
  @udp_segment 103
  @udp_gro 104
  @buffer_bytes 4 * 1024 * 1024
  @recv_size 65_536
  # Messages per read batch: with GRO up to ~48 datagrams each, so one batch
  # stays within about a millisecond of NIF work.
  @max_reads 8

  @doc """
  Opens a UDP socket bound to `{ip, port}` with big buffers and GRO. With
  `reuseport: true`, SO_REUSEPORT is set before binding, so that several
  sockets (of this OS user) share the address and the kernel spreads
  clients over them.
  """
  def open(ip, port, opts \\ []) do
    family = family(ip)

    with {:ok, socket} <- :socket.open(family, :dgram, :udp),
         :ok <- reuseport(socket, Keyword.get(opts, :reuseport, false)),
         :ok <- bind(socket, %{family: family, addr: ip, port: port}) do
      _ = :socket.setopt(socket, {:socket, :rcvbuf}, @buffer_bytes)
      _ = :socket.setopt(socket, {:socket, :sndbuf}, @buffer_bytes)
      gro? = :socket.setopt_native(socket, {@sol_udp, @udp_gro}, 1) == :ok
      {:ok, socket, %{gro: gro?, gso: gso_supported?()}}
    end
  end

  defp reuseport(_socket, false), do: :ok

  defp reuseport(socket, true) do
    case :socket.setopt(socket, {:socket, :reuseport}, true) do
      :ok ->
        :ok

      {:error, reason} ->
        close(socket)
        {:error, reason}
    end
  end

  defp bind(socket, addr) do
    case :socket.bind(socket, addr) do
      :ok ->
        :ok

      {:error, reason} ->
        close(socket)
        {:error, reason}
    end
  end

  # UDP GSO needs Linux >= 4.18; assume it there and fall back on the first
  # failed send.
  defp gso_supported? do
    match?({:unix, :linux}, :os.type())
  end

  @doc false
  def family(ip) when tuple_size(ip) == 4, do: :inet
  def family(ip) when tuple_size(ip) == 8, do: :inet6

  @doc false
  def sockname(socket) do
    case :socket.sockname(socket) do
      {:ok, %{addr: addr, port: port}} -> {:ok, {addr, port}}
      {:error, reason} -> {:error, reason}
    end
  end

  @doc false
  def sockaddr({ip, port}), do: %{family: family(ip), addr: ip, port: port}

  @doc false
  # Closes a socket we are done with. :socket.close/1 fails only for a socket
  # that is already closed (or whose owner died), which leaves the same
  # result: the socket is gone, so there is nothing to act on.
  @spec close(:socket.socket()) :: :ok
  def close(socket) do
    _ = :socket.close(socket)
    :ok
  end

  @doc """
  Reads up to #{@max_reads} datagrams without blocking. Returns
  `{packets, status}` where packets are `{from, data, segment_size}` in
  arrival order and status is `:selected` (a select message will come),
  `:more` (stopped at the batch limit) or `{:error, reason}`.
  """
  def read_batch(socket), do: read_batch(socket, @max_reads, [])

  defp read_batch(_socket, 0, acc), do: {Enum.reverse(acc), :more}

  defp read_batch(socket, n, acc) do
    case :socket.recvmsg(socket, @recv_size, 64, [], :nowait) do
      {:ok, %{addr: %{addr: ip, port: port}, iov: iov, ctrl: ctrl}} ->
        data = iov |> IO.iodata_to_binary() |> unpin()
        read_batch(socket, n - 1, [{{ip, port}, data, segment_size(ctrl)} | acc])

      {:ok, _other} ->
        read_batch(socket, n - 1, acc)

      {:select, _info} ->
        {Enum.reverse(acc), :selected}

      {:error, reason} ->
        {Enum.reverse(acc), {:error, reason}}
    end
  end

  # recvmsg returns a part of a #{@recv_size}-byte buffer; a connection that
  # keeps a small datagram until its next garbage collection (an idle one
  # may not collect for a long time) would pin the whole buffer. Small
  # datagrams are copied out (about a microsecond for 1,350 bytes); full GRO
  # buffers are not.
  defp unpin(data) do
    if byte_size(data) * 4 < :binary.referenced_byte_size(data),
      do: :binary.copy(data),
      else: data
  end

  defp segment_size([%{level: :udp, type: @udp_gro, data: <<size::native-32>>} | _]), do: size
  defp segment_size([_ | rest]), do: segment_size(rest)
  defp segment_size([]), do: 0

  @doc """
  Sends one batch from the NIF: `data` holds segments of `seg` bytes (the
  last may be shorter). Uses GSO when `gso?` and the batch has more than one
  segment. Returns `:ok`, `{:ok, :gso_off}` when GSO failed and the batch
  went out datagram by datagram, or `{:error, reason}`.
  """
  def send_batch(socket, to, data, seg, gso?) do
    addr = sockaddr(to)

    cond do
      byte_size(data) <= seg ->
        send_one(socket, data, addr)

      gso? ->
        msg = %{iov: [data], addr: addr, ctrl: [gso_ctrl(seg)]}

        case :socket.sendmsg(socket, msg) do
          :ok ->
            :ok

          {:error, reason} when reason in [:eio, :einval, :enotsup, :eopnotsupp, :enoprotoopt] ->
            with :ok <- send_split(socket, data, seg, addr), do: {:ok, :gso_off}

          {:error, _} = error ->
            error
        end

      true ->
        send_split(socket, data, seg, addr)
    end
  end

  defp gso_ctrl(seg), do: %{level: :udp, type: @udp_segment, data: <<seg &&& 0xFFFF::native-16>>}

  defp send_split(socket, data, seg, addr) when byte_size(data) > seg do
    <<head::binary-size(seg), rest::binary>> = data

    case send_one(socket, head, addr) do
      :ok -> send_split(socket, rest, seg, addr)
      error -> error
    end
  end

  defp send_split(socket, data, _seg, addr), do: send_one(socket, data, addr)

  # Datagram sends: a full kernel buffer (ENOBUFS/EAGAIN) is treated like a
  # loss on the wire, which QUIC recovers from; other errors are returned.
  defp send_one(socket, data, addr) do
    case :socket.sendto(socket, data, addr) do
      :ok -> :ok
      {:error, reason} when reason in [:enobufs, :eagain, :ewouldblock] -> :ok
      {:error, {reason, _rest}} when reason in [:enobufs, :eagain, :ewouldblock] -> :ok
      {:error, _} = error -> error
    end
  end
end
